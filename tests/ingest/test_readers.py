"""Each reader on tiny hand-made files: canonical codes, units, times and values."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ingest.ingestion import ingest
from tests.ingest.conftest import KEY, balanced

LONG = """patient_id,time,code,value,unit,source
MRN-000001,2026-01-05T08:00:00Z,heart_rate,88,/min,ward
MRN-000001,2026-01-05T08:00:00Z,8310-5,100.4,[degF],ward
MRN-000001,2026-01-05T08:00:00+01:00,sbp,16,kPa,ward
MRN-000001,2026-01-05T08:00:00Z,creatinine,88.4,umol/L,lab
MRN-000001,2026-01-05T08:00:00Z,consciousness,V,,ward
MRN-000001,2026-01-05T08:00:00Z,o2_support,room air,,ward
MRN-000001,2026-01-05T08:00:00Z,spo2,0.95,1,ward
MRN-000002,2026-01-05 09:30:00,resp_rate,22,,
"""


def _value(obs: pd.DataFrame, code: str) -> float:
    return float(obs.loc[obs["code"] == code, "value"].iloc[0])


def test_long_csv_units_codes_and_times(write, cfg, vocab):
    p = write("obs.csv", LONG)
    res = ingest([p], cfg, vocab, KEY)
    obs = res.observations
    assert len(obs) == 8 and res.quarantine.empty
    assert _value(obs, "body_temp") == pytest.approx(38.0)  # 100.4 °F
    assert _value(obs, "sbp") == pytest.approx(120.0, abs=0.01)  # 16 kPa
    assert _value(obs, "creatinine") == pytest.approx(1.0, abs=1e-6)  # 88.4 umol/L
    assert _value(obs, "consciousness") == 2  # ACVPU "V"
    assert _value(obs, "o2_support") == 0
    assert _value(obs, "spo2") == pytest.approx(95)
    sbp_time = obs.loc[obs["code"] == "sbp", "time"].iloc[0]
    assert sbp_time == pd.Timestamp("2026-01-05T07:00:00Z")  # +01:00 converted to UTC
    assert str(obs["time"].dtype) == "datetime64[ns, UTC]"
    rr = obs[obs["code"] == "resp_rate"].iloc[0]
    assert rr["time"] == pd.Timestamp("2026-01-05T09:30:00Z")  # naive -> UTC (naive_time: utc)
    assert rr["source"] == "unknown"
    assert obs["patient_id"].str.match(r"^p_[0-9a-f]{20}$").all()
    assert balanced(res.report)


def test_long_parquet(tmp_path, cfg, vocab):
    df = pd.DataFrame(
        {
            "patient_id": ["MRN-1", "MRN-1"],
            "time": pd.to_datetime(["2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"], utc=True),
            "code": ["8867-4", "spo2"],
            "value": [70.0, 140.0],
            "unit": ["/min", "%"],
        }
    )
    p = tmp_path / "obs.parquet"
    df.to_parquet(p)
    res = ingest([p], cfg, vocab, KEY)
    assert res.observations["code"].tolist() == ["heart_rate"]
    assert res.quarantine["reason"].str.startswith("out-of-range value").tolist() == [True]
    assert "MRN-1" not in res.quarantine["record"].iloc[0]
    assert balanced(res.report)


def test_wide_csv_mapping(write, cfg, vocab):
    p = write(
        "wide.csv",
        "patient_id,time,HR,SpO2,TempF,SleepMin\n"
        "MRN-000003,2026-01-05 07:00:00,61,97,98.6,420\n"
        "MRN-000003,2026-01-05 07:05:00,64,,,\n",
    )
    res = ingest([p], cfg, vocab, KEY)
    obs = res.observations
    assert sorted(obs["code"].unique()) == ["body_temp", "heart_rate", "sleep_duration", "spo2"]
    assert len(obs) == 5
    assert _value(obs, "body_temp") == pytest.approx(37.0)
    assert _value(obs, "sleep_duration") == pytest.approx(7.0)
    assert (obs["source"] == "wearable").all()
    assert res.report["files"][str(p)]["read"] == 5


OBS_BP = {
    "resourceType": "Observation",
    "id": "bp1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
    "subject": {"reference": "Patient/MRN-000004"},
    "effectiveDateTime": "2026-01-05T10:00:00Z",
    "component": [
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": {
                "value": 101,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        },
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
            "valueQuantity": {
                "value": 60,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        },
    ],
}
OBS_ACVPU = {
    "resourceType": "Observation",
    "id": "c1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "80288-4"}]},
    "subject": {"reference": "Patient/MRN-000004"},
    "effectiveDateTime": "2026-01-05T10:00:00Z",
    "valueCodeableConcept": {"text": "Confused"},
}
OBS_CREAT = {
    "resourceType": "Observation",
    "id": "l1",
    "status": "final",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "laboratory",
                }
            ]
        }
    ],
    "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
    "subject": {"reference": "Patient/MRN-000004"},
    "effectiveDateTime": "2026-01-05T06:00:00Z",
    "valueQuantity": {
        "value": 176.8,
        "unit": "umol/L",
        "system": "http://unitsofmeasure.org",
        "code": "umol/L",
    },
}
PATIENT = {
    "resourceType": "Patient",
    "id": "MRN-000004",
    "gender": "female",
    "birthDate": "1950-01-01",
}


def test_fhir_ndjson_panel_components_and_concepts(write, cfg, vocab):
    text = "\n".join(json.dumps(r) for r in (PATIENT, OBS_BP, OBS_ACVPU, OBS_CREAT)) + "\n"
    p = write("Observation.ndjson", text)
    res = ingest([p], cfg, vocab, KEY)
    obs = res.observations
    assert sorted(obs["code"]) == ["consciousness", "creatinine", "dbp", "sbp"]
    assert _value(obs, "sbp") == 101 and _value(obs, "dbp") == 60
    assert _value(obs, "consciousness") == 1
    assert _value(obs, "creatinine") == pytest.approx(2.0, abs=1e-3)
    assert obs.loc[obs["code"] == "creatinine", "source"].iloc[0] == "lab"
    assert res.patients["sex"].tolist() == ["F"]  # Patient resource fills an unknown patient
    assert balanced(res.report)


def test_fhir_bundle(write, cfg, vocab):
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in (OBS_BP, OBS_CREAT)],
    }
    p = write("bundle.json", json.dumps(bundle, indent=1))
    res = ingest([p], cfg, vocab, KEY)
    assert sorted(res.observations["code"]) == ["creatinine", "dbp", "sbp"]


def test_fhir_invalid_resource_quarantined(write, cfg, vocab):
    bad = dict(OBS_ACVPU, subject="Patient/MRN-000004")  # Reference must be an object
    p = write("o.ndjson", json.dumps(bad) + "\n")
    res = ingest([p], cfg, vocab, KEY)
    assert res.observations.empty
    assert res.quarantine["reason"].iloc[0].startswith("invalid FHIR R4 Observation")
    assert balanced(res.report)


def test_psv_directory_with_anchor(write, cfg, vocab, tmp_path):
    write(
        "psv/MRN-000005.psv",
        "HR|O2Sat|Temp|SBP|DBP|Resp|FiO2|Age|Gender|ICULOS\n"
        "80|96|37.1|120|70|16|0.21|70|0|1\n"
        "NaN|NaN|NaN|NaN|NaN|NaN|NaN|70|0|2\n"
        "0|92|NaN|NaN|NaN|24|0.35|70|0|3\n",
    )
    write("psv/anchors.csv", "patient_file,anchor_time\nMRN-000005,2026-01-05T00:00:00Z\n")
    res = ingest([tmp_path / "psv"], cfg, vocab, KEY)
    obs = res.observations
    assert len(obs) == 12  # 7 + 4 cells, FiO2 twice (fio2 and o2_support), HR 0 quarantined
    t = obs.loc[obs["code"] == "resp_rate", "time"].tolist()
    assert t == [pd.Timestamp("2026-01-05T01:00:00Z"), pd.Timestamp("2026-01-05T03:00:00Z")]
    assert obs.loc[obs["code"] == "o2_support", "value"].tolist() == [0.0, 1.0]  # FiO2 > 0.21
    assert obs.loc[obs["code"] == "fio2", "value"].tolist() == [0.21, 0.35]
    pat = res.patients.iloc[0]  # demographics of the file (no patients table)
    assert (pat["age"], pat["sex"], pat["setting"]) == (70, "F", "icu")
    assert pat["followup_end"] == pd.Timestamp("2026-01-05T03:00:00Z")
    assert res.quarantine["reason"].str.startswith("out-of-range value").all()
    assert "MRN-000005" not in res.quarantine["record"].iloc[0]
    assert balanced(res.report)


def test_patients_outcomes_and_cohort(write, cfg, vocab):
    pats = write(
        "patients.csv",
        "patient_id,setting,age,sex,cm_copd,followup_start,followup_end,consent_care,consent_model_training,consent_research\n"
        "MRN-000001,ward,70,F,1,2026-01-01T00:00:00Z,2026-01-10T00:00:00Z,true,true,false\n",
    )
    outs = write(
        "outcomes.csv", "patient_id,time,event\nMRN-000001,2026-01-09T00:00:00Z,icu_transfer\n"
    )
    coh = write(
        "cohort.csv",
        "patient_id,index_time,age,sex,HR,spo2,creatinine,event,time_to_event_h,event_observed\n"
        "MRN-000001,2026-01-01T00:00:00Z,70,F,90,95,1.1,icu_transfer,192.0,1\n",
    )
    res = ingest([pats, outs, coh], cfg, vocab, KEY)
    p = res.patients.iloc[0]
    assert p["age"] == 70.0 and p["cm_copd"] == 1 and bool(p["consent_model_training"]) is True
    assert str(res.patients["followup_end"].dtype) == "datetime64[ns, UTC]"
    assert res.outcomes["event"].tolist() == ["icu_transfer"]
    c = res.cohort
    assert c is not None and c.loc[0, "heart_rate"] == 90 and c.loc[0, "event"] == 1
    assert c.loc[0, "event_type"] == "icu_transfer" and c.loc[0, "time_to_event_days"] == 8.0
    assert c.loc[0, "time"] == pd.Timestamp("2026-01-01T00:00:00Z")
    assert (
        c.loc[0, "patient_id"]
        == res.patients.loc[0, "patient_id"]
        == res.outcomes.loc[0, "patient_id"]
    )
    assert balanced(res.report)


def test_wide_parquet(tmp_path, cfg, vocab):
    df = pd.DataFrame(
        {
            "patient_id": ["MRN-7", "MRN-7"],
            "time": ["2026-01-05T07:00:00Z", "2026-01-05T08:00:00Z"],
            "HR": [60.0, None],
            "SpO2": [97.0, 30.0],
        }
    )
    p = tmp_path / "wide.parquet"
    df.to_parquet(p)
    res = ingest([p], cfg, vocab, KEY)
    assert sorted(res.observations["code"]) == ["heart_rate", "spo2"]
    assert res.quarantine["reason"].str.startswith("out-of-range value").tolist() == [True]
    assert "MRN-7" not in res.quarantine["record"].iloc[0]
    assert balanced(res.report)


def test_blank_source_gets_the_format_default(write, vocab):
    from ingest.config import IngestConfig

    cfg = IngestConfig(missing_consent="include", default_source={"long_csv": "ehr"})
    p = write(
        "obs.csv", "patient_id,time,code,value,source\nMRN-1,2026-01-05T07:00:00Z,heart_rate,70,\n"
    )
    assert ingest([p], cfg, vocab, KEY).observations["source"].tolist() == ["ehr"]
