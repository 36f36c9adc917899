"""Consent per purpose from the patient table and from FHIR R4 Consent resources."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from governance.consent import (
    V3_ACT_REASON,
    ConsentError,
    consent_from_fhir,
    consent_summary,
    filter_by_consent,
    merge_consent,
    read_fhir_consents,
)
from governance.pseudonym import pseudonymise

KEY = b"test-key"
A, B, C = (pseudonymise(x, KEY) for x in ("MRN-A", "MRN-B", "MRN-C"))


@pytest.fixture
def patients() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": [A, B, C],
            "age": [70.0, 50.0, 80.0],
            "consent_care": [True, True, True],
            "consent_model_training": [True, False, None],
            "consent_research": ["yes", "no", "1"],
        }
    )


def test_filter_patient_table(patients: pd.DataFrame) -> None:
    before = patients.copy()
    kept, res = filter_by_consent(patients, "model_training")
    assert list(kept["patient_id"]) == [A]  # None means no consent
    assert (res.patients_kept, res.patients_excluded) == (1, 2)
    kept, res = filter_by_consent(patients, "research")
    assert set(kept["patient_id"]) == {A, C}
    pd.testing.assert_frame_equal(patients, before)  # input not mutated


def test_filter_observations_with_patient_table(patients: pd.DataFrame) -> None:
    obs = pd.DataFrame({"patient_id": [A, A, B, "p_" + "0" * 20], "value": [1.0, 2, 3, 4]})
    kept, res = filter_by_consent(obs, "model_training", patients=patients)
    assert list(kept["value"]) == [1.0, 2.0]
    assert res.as_dict() == {
        "purpose": "model_training",
        "patients_kept": 1,
        "patients_excluded": 2,  # B declined, the unknown patient has no consent record
        "rows_kept": 2,
        "rows_excluded": 2,
    }


def test_missing_column_and_unknown_purpose(patients: pd.DataFrame) -> None:
    with pytest.raises(ConsentError, match="consent_research"):
        filter_by_consent(patients.drop(columns="consent_research"), "research")
    with pytest.raises(ConsentError, match="unknown consent purpose"):
        filter_by_consent(patients, "marketing")


def test_summary(patients: pd.DataFrame) -> None:
    assert consent_summary(patients) == {
        "care": {"consented": 3, "excluded": 0},
        "model_training": {"consented": 1, "excluded": 2},
        "research": {"consented": 2, "excluded": 1},
    }


def _consent(
    pid: str,
    status: str = "active",
    provision: dict | None = None,
    when: str = "2025-01-01T00:00:00Z",
) -> dict:
    return {
        "resourceType": "Consent",
        "id": f"c-{pid}-{when[:4]}",
        "status": status,
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "dateTime": when,
        "provision": provision,
    }


def _purpose(code: str) -> dict:
    return {"system": V3_ACT_REASON, "code": code}


def test_fhir_consent_purposes_and_nesting() -> None:
    resources = [
        # A: permit everything except research (nested deny)
        _consent(
            "MRN-A",
            provision={
                "type": "permit",
                "provision": [{"type": "deny", "purpose": [_purpose("HRESCH")]}],
            },
        ),
        # B: permit treatment and quality improvement only
        _consent(
            "MRN-B",
            provision={"type": "permit", "purpose": [_purpose("TREAT"), _purpose("HQUALIMP")]},
        ),
        # C: inactive consent is ignored; no other resource -> no consent at all
        _consent("MRN-C", status="inactive", provision={"type": "permit"}),
    ]
    df = consent_from_fhir(resources, KEY).set_index("patient_id")
    assert "MRN-A" not in df.to_json()  # pseudonymised
    assert df.loc[A].to_dict() == {
        "consent_care": True,
        "consent_model_training": True,
        "consent_research": False,
    }
    assert df.loc[B].to_dict() == {
        "consent_care": True,
        "consent_model_training": True,
        "consent_research": False,
    }
    assert C not in df.index
    raw = consent_from_fhir(resources, None)  # inside the enclave, before pseudonymisation
    assert set(raw["patient_id"]) == {"MRN-A", "MRN-B"}


def test_fhir_latest_consent_wins_and_period() -> None:
    resources = [
        _consent("MRN-A", provision={"type": "permit"}, when="2024-01-01T00:00:00Z"),
        _consent(
            "MRN-A",
            provision={"type": "deny", "purpose": [_purpose("MLTRAINING")]},
            when="2025-06-01T00:00:00Z",
        ),
        _consent(
            "MRN-B",
            provision={"type": "permit", "period": {"start": "2020-01-01", "end": "2021-01-01"}},
        ),
    ]
    df = consent_from_fhir(resources, KEY, at=datetime(2026, 1, 1, tzinfo=UTC)).set_index(
        "patient_id"
    )
    assert df.loc[A].to_dict() == {
        "consent_care": True,
        "consent_model_training": False,
        "consent_research": True,
    }
    assert not df.loc[B].any()  # only consent is outside its period


def test_fhir_invalid_resource_names_it() -> None:
    bad = _consent("MRN-A", provision={"type": "permit"})
    bad["status"] = 12345
    bad["scope"] = "not-a-codeable-concept"
    with pytest.raises(ConsentError, match="Consent/c-MRN-A"):
        consent_from_fhir([bad], KEY)


def test_read_bundle_and_ndjson_then_merge(tmp_path: Path, patients: pd.DataFrame) -> None:
    res = [
        _consent("MRN-A", provision={"type": "deny", "purpose": [_purpose("HQUALIMP")]}),
        _consent("MRN-C", provision={"type": "permit"}),
    ]
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in res]
        + [{"resource": {"resourceType": "Patient", "id": "x"}}],
    }
    (tmp_path / "b.json").write_text(json.dumps(bundle))
    (tmp_path / "c.ndjson").write_text("\n".join(json.dumps(r) for r in res) + "\n")
    assert len(read_fhir_consents(tmp_path / "b.json")) == 2
    assert read_fhir_consents(tmp_path / "c.ndjson") == res
    merged = merge_consent(patients, consent_from_fhir(res, KEY)).set_index("patient_id")
    # A: table says yes, FHIR denies -> no; C: table None, FHIR permits -> most restrictive: no
    assert not merged.loc[A, "consent_model_training"]
    assert not merged.loc[C, "consent_model_training"]
    assert merged.loc[C, "consent_research"] and merged.loc[B, "consent_care"]
