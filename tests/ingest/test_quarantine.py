"""Every kind of bad record lands in quarantine with the right reason, and the counts add up."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ingest.config import IngestConfig
from ingest.ingestion import ingest
from tests.ingest.conftest import KEY, balanced

HEADER = "patient_id,time,code,value,unit,source\n"
GOOD = "MRN-000001,2026-01-05T08:00:00Z,heart_rate,80,/min,ward\n"


@pytest.mark.parametrize(
    ("line", "field", "reason"),
    [
        ("MRN-000001,2026-02-30T25:61:00Z,heart_rate,80,/min,ward", "time", "unparseable time"),
        ("MRN-000001,yesterday,heart_rate,80,/min,ward", "time", "unparseable time"),
        ("MRN-000001,2026-01-05T08:00:00Z,heart_rate,80,furlongs,ward", "unit", "unknown unit"),
        ("MRN-000001,2026-01-05T08:00:00Z,heart_rate,999,/min,ward", "value", "out-of-range value"),
        ("MRN-000001,2026-01-05T08:00:00Z,spo2,140,%,ward", "value", "out-of-range value"),
        ("MRN-000001,2026-01-05T08:00:00Z,body_temp,3.7,Cel,ward", "value", "out-of-range value"),
        ("MRN-000001,2026-01-05T08:00:00Z,heart_rate,,/min,ward", "value", "missing field: value"),
        (
            ",2026-01-05T08:00:00Z,heart_rate,80,/min,ward",
            "patient_id",
            "missing field: patient_id",
        ),
        ("MRN-000001,,heart_rate,80,/min,ward", "time", "missing field: time"),
        (
            "MRN-000001,2026-01-05T08:00:00Z,consciousness,sleepy,,ward",
            "value",
            "unparseable value",
        ),
        (
            "MRN-000001,2026-01-05T08:00:00Z,heart_rate,80,/min,ward,extra",
            "line",
            "wrong number of fields",
        ),
    ],
)
def test_bad_csv_records(write, cfg, vocab, line, field, reason):
    p = write("obs.csv", HEADER + GOOD + line + "\n" + GOOD.replace("08:00", "09:00"))
    res = ingest([p], cfg, vocab, KEY)
    q = res.quarantine
    assert len(q) == 1, q
    assert q.loc[0, "field"] == field
    assert q.loc[0, "reason"].startswith(reason)
    assert q.loc[0, "line"] == 3 and q.loc[0, "file"] == str(p)
    assert "MRN-000001" not in q.loc[0, "record"]
    assert ("p_" in q.loc[0, "record"]) == line.startswith("MRN")
    assert len(res.observations) == 2
    assert balanced(res.report)
    assert res.report["totals"]["quarantined"] == 1


def test_wrong_encoding_line(write, cfg, vocab):
    data = (
        (HEADER + GOOD).encode()
        + "MRN-000001,2026-01-05T08:00:00Z,creatinine,90,µmol/L,lab\n".encode("latin-1")
        + GOOD.replace("08:00", "10:00").encode()
    )
    p = write("obs.csv", data)
    res = ingest([p], cfg, vocab, KEY)
    q = res.quarantine
    assert q["field"].tolist() == ["encoding"] and q.loc[0, "line"] == 3
    assert q.loc[0, "reason"].startswith("wrong encoding")
    assert len(res.observations) == 2 and balanced(res.report)


def test_naive_time_rejected_when_configured(write, vocab):
    cfg = IngestConfig(missing_consent="include", naive_time="reject")
    p = write("obs.csv", HEADER + GOOD + "MRN-000001,2026-01-05 09:00:00,heart_rate,80,/min,ward\n")
    res = ingest([p], cfg, vocab, KEY)
    assert res.quarantine["reason"].tolist() == [
        "naive time without UTC offset (ingest.naive_time: reject)"
    ]


def test_broken_and_bad_fhir_lines(write, cfg, vocab):
    good = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/MRN-000009"},
        "effectiveDateTime": "2026-01-05T10:00:00Z",
        "valueQuantity": {"value": 70, "unit": "/min", "code": "/min"},
    }
    no_value = {k: v for k, v in good.items() if k != "valueQuantity"}
    unknown = dict(good, code={"coding": [{"system": "http://loinc.org", "code": "99999-0"}]})
    bad_unit = dict(good, valueQuantity={"value": 70, "code": "parsecs"})
    panel = dict(good, code={"coding": [{"code": "85354-9"}]})
    panel.pop("valueQuantity")
    lines = [
        json.dumps(good),
        json.dumps(good)[:40],
        json.dumps(no_value),
        json.dumps(unknown),
        json.dumps(bad_unit),
        json.dumps(panel),
        json.dumps({"resourceType": "Encounter", "status": "finished", "class": {"code": "IMP"}}),
    ]
    p = write("Observation.ndjson", "\n".join(lines) + "\n")
    res = ingest([p], cfg, vocab, KEY)
    q = res.quarantine.sort_values("line").reset_index(drop=True)
    assert q["line"].tolist() == [2, 3, 5, 6, 7]  # line 4: an unknown code is unmapped
    reasons = q["reason"].tolist()
    assert reasons[0].startswith("broken JSON line")
    assert reasons[1] == "missing field: value"
    assert reasons[2].startswith("unknown unit 'parsecs'")
    assert reasons[3].startswith("missing field: component")
    assert reasons[4].startswith("unsupported resourceType 'Encounter'")
    assert res.report["unmapped"] == {"99999-0 (unmapped code)": 1}
    assert not q["record"].str.contains("MRN-000009").any()
    assert len(res.observations) == 1 and balanced(res.report)


def test_wide_bad_time_quarantines_each_cell(write, cfg, vocab):
    p = write(
        "wide.csv",
        "patient_id,time,HR,SpO2\nMRN-1,2026-01-05 07:00:00,60,97\nMRN-1,31/02/2026 07:00,61,98\n",
    )
    res = ingest([p], cfg, vocab, KEY)
    assert len(res.quarantine) == 2 and (res.quarantine["line"] == 3).all()
    f = res.report["files"][str(p)]
    assert f["read"] == 4 and f["accepted"] == 2 and f["quarantined"] == 2


def test_duplicates_removed_and_counted(write, cfg, vocab):
    p = write("obs.csv", HEADER + GOOD + GOOD + GOOD.replace("80", "81"))
    p2 = write("more.csv", HEADER + GOOD)
    res = ingest([p, p2], cfg, vocab, KEY)
    assert len(res.observations) == 2
    assert res.report["totals"]["duplicates"] == 2
    assert res.report["files"][str(p)]["duplicates"] == 1
    assert res.report["files"][str(p2)]["duplicates"] == 1
    assert balanced(res.report)


def test_consent_filter(write, vocab):
    cfg = IngestConfig()  # purpose model_training, missing consent -> exclude
    pats = write(
        "patients.csv",
        "patient_id,consent_care,consent_model_training,consent_research\n"
        "MRN-000001,true,true,true\nMRN-000002,true,false,true\nMRN-000004,true,maybe,true\n",
    )
    obs = write(
        "obs.csv",
        HEADER
        + GOOD
        + GOOD.replace("MRN-000001", "MRN-000002")
        + GOOD.replace("MRN-000001", "MRN-000003"),
    )
    outs = write("outcomes.csv", "patient_id,time,event\nMRN-000002,2026-01-06T00:00:00Z,death\n")
    res = ingest([pats, obs, outs], cfg, vocab, KEY)
    assert res.observations["patient_id"].nunique() == 1
    assert len(res.patients) == 1 and res.outcomes.empty
    r = res.report
    assert r["totals"]["consent_excluded"] == 2 + 1 + 1  # 2 observations, 1 outcome, 1 patient row
    # MRN-000002 refused, MRN-000003 has no patients row (policy exclude): both excluded
    assert r["consent"]["patients_excluded"] == 2
    assert r["consent"]["patients_refused"] == 1
    assert r["consent"]["patients_without_consent_record"] == 1
    assert res.quarantine["reason"].str.startswith("invalid consent value").sum() == 1
    assert balanced(r)
    # purpose research: MRN-000002 is allowed now
    res2 = ingest([pats, obs, outs], IngestConfig(purpose="research"), vocab, KEY)
    assert res2.observations["patient_id"].nunique() == 2 and len(res2.outcomes) == 1


def test_pseudonyms_are_keyed_and_consistent(write, cfg, vocab):
    p = write("obs.csv", HEADER + GOOD)
    a = ingest([p], cfg, vocab, KEY).observations["patient_id"].iloc[0]
    b = ingest([p], cfg, vocab, b"another-key").observations["patient_id"].iloc[0]
    assert a != b and a.startswith("p_") and len(a) == 22
    assert isinstance(pd.Timestamp.now(), pd.Timestamp)


def test_unknown_code_is_unmapped_and_counted(write, cfg, vocab):
    bad = "MRN-000001,2026-01-05T08:00:00Z,9999-9,80,/min,ward\n"
    p = write("obs.csv", HEADER + GOOD + bad + bad.replace("08:00", "09:00"))
    res = ingest([p], cfg, vocab, KEY)
    assert res.quarantine.empty and len(res.observations) == 1
    assert res.report["unmapped"] == {"9999-9 (unmapped code)": 2}
    assert res.report["totals"]["unmapped"] == 2 and balanced(res.report)
