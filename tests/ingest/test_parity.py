"""One canonical path: the same records through ingest and through the service's input
preparation (``/v1/score``) and collection (``/v1/observations``) give the same accepted
values and the same rejections, each mapped to its own policy."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ingest.config import IngestConfig
from ingest.ingestion import ingest
from serving.config import ServeConfig
from serving.landing import validate_items
from serving.schemas import ObservationIn, PatientIn
from serving.scoring import InputError, prepare_patients
from tests.ingest.conftest import KEY

NOW = datetime(2026, 1, 6, tzinfo=UTC)
#: (code, value, unit): accepted ones and every kind of refusal the three paths share
RECORDS = [
    ("heart_rate", 88, "/min"),
    ("8310-5", 100.4, "[degF]"),
    ("sbp", 16, "kPa"),
    ("creatinine", 88.4, "umol/L"),
    ("consciousness", "V", None),
    ("o2_support", "room air", None),
    ("spo2", 0.95, "1"),
    ("resp_rate", 22, None),
    ("o2_support", 0.4, "{FiO2}"),
    ("creatinine", 0.09999084, "mg/dL"),
    ("heart_rate", 900, "/min"),  # implausible
    ("o2_support", 4000, "{FiO2}"),  # implausible input
    ("glucose", 65, None),  # no unit, no default
    ("heart_rate", 80, "kg"),  # unknown unit
    ("consciousness", "sleepy", None),  # unknown category
]
T = "2026-01-05T08:00:00Z"


def _csv(tmp_path, records) -> str:
    lines = ["patient_id,time,code,value,unit"]
    lines += [f"MRN-1,{T},{c},{v},{u or ''}" for c, v, u in records]
    p = tmp_path / "obs.csv"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_ingest_and_collection_agree(tmp_path, vocab):
    cfg = IngestConfig(missing_consent="include")
    cfg = IngestConfig.model_validate(
        {**cfg.model_dump(), "time_window": {"reference": "2026-01-06T00:00:00Z"}}
    )
    res = ingest([_csv(tmp_path, RECORDS)], cfg, vocab, KEY)
    q = res.quarantine.sort_values("line")
    items = [
        {"patient_id": "MRN-1", "time": T, "code": c, "value": v, "unit": u} for c, v, u in RECORDS
    ]
    rows, rejected = validate_items(items, vocab, lambda s: s, 5.0, now=NOW)
    # accepted: the same canonical values, in the same order
    got = res.observations.astype({"code": str})[["code", "value"]]
    landed = [(r["code"], float(r["value"])) for r in rows]
    assert sorted(landed) == sorted(zip(got["code"], got["value"], strict=True))
    # refused: the same records (line = index + 2) with the same reason text
    assert [r.index + 2 for r in rejected] == q["line"].tolist()
    assert [r.reason for r in rejected] == q["reason"].tolist()
    assert [r.field for r in rejected] == q["field"].tolist()


def test_scoring_maps_the_same_verdicts_to_its_policy(vocab):
    obs = [ObservationIn(time=T, code=c, value=v, unit=u) for c, v, u in RECORDS]
    patient = PatientIn(patient_id="MRN-1", observations=obs)
    with pytest.raises(InputError) as err:
        prepare_patients([patient], vocab, ServeConfig(), now=NOW)
    locs = [loc for loc, _ in err.value.problems]
    # unknown unit/category and a unit-less lab: 422 naming the observation
    assert locs == [
        "patients[0].observations[12].unit",
        "patients[0].observations[13].unit",
        "patients[0].observations[14].value",
    ]
    # without those, the implausible values are warnings and the rest is accepted
    ok = PatientIn(patient_id="MRN-1", observations=obs[:12])
    prepared = prepare_patients([ok], vocab, ServeConfig(), now=NOW)[0]
    assert len(prepared.values) == 10
    assert sum("outside plausible" in w for w in prepared.warnings) == 2


def test_implausible_prediction_time_refused(vocab):
    obs = [ObservationIn(time=T, code="heart_rate", value=80, unit="/min")]
    for as_of in ("1970-01-01T00:00:00Z", "1926-01-05T08:00:00Z"):
        p = PatientIn(patient_id="MRN-1", observations=obs, as_of=as_of)
        with pytest.raises(InputError, match="implausible prediction time"):
            prepare_patients([p], vocab, ServeConfig(), now=NOW)
    old = [ObservationIn(time="2020-01-01T00:00:00Z", code="heart_rate", value=80, unit="/min")]
    p = PatientIn(patient_id="MRN-1", observations=old + obs, as_of=T)
    with pytest.raises(InputError, match="365 days before the reference"):
        prepare_patients([p], vocab, ServeConfig(), now=NOW)
