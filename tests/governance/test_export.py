"""Research export: consent, k-anonymity refusal, consistent per-patient date shifting, audit."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from governance.audit import AuditLog
from governance.export import (
    ExportConfig,
    ExportRefused,
    age_band,
    build_export,
    date_shift_days,
    research_id,
)
from pipelines.cli import main
from tests.governance.conftest import TEST_KEY, make_cohort


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VITALRISK_PSEUDONYM_KEY", TEST_KEY.decode())
    monkeypatch.setenv("VITALRISK_AUDIT_LOG", str(tmp_path / "logs" / "audit.jsonl"))
    monkeypatch.delenv("VITALRISK_AUDIT_KEY", raising=False)
    monkeypatch.delenv("VITALRISK_MODE", raising=False)


def test_age_band() -> None:
    bands = age_band(pd.Series([17.0, 60.0, 69.9, 89.0, 90.0, 104.0, None]), 10, 90)
    assert bands.tolist()[:6] == ["10-19", "60-69", "60-69", "80-89", "90+", "90+"]
    assert pd.isna(bands.iloc[6])


def test_date_shift_is_keyed_nonzero_and_bounded() -> None:
    pids = [f"p_{i:020x}" for i in range(500)]
    shifts = [date_shift_days(p, TEST_KEY, 30) for p in pids]
    assert all(1 <= abs(s) <= 30 for s in shifts)
    assert len(set(shifts)) > 40 and min(shifts) < 0 < max(shifts)
    assert shifts == [date_shift_days(p, TEST_KEY, 30) for p in pids]  # deterministic
    assert shifts != [date_shift_days(p, b"other", 30) for p in pids]  # keyed
    assert research_id(pids[0], TEST_KEY) != research_id(pids[0], b"other")


def test_build_export_shifts_consistently_and_minimises() -> None:
    obs, patients, outcomes = make_cohort()
    res = build_export(obs, patients, outcomes, ExportConfig(k=5), TEST_KEY)
    consented = patients[patients["consent_research"]]
    assert len(res.patients) == len(consented) == res.manifest["patients"]
    assert res.manifest["consent"]["patients_excluded"] == len(patients) - len(consented)
    assert set(res.patients.columns) == {
        "research_id",
        "age_band",
        "sex",
        "setting",
        "followup_start",
        "followup_end",
    }
    assert set(res.exported_pseudonyms) == set(consented["patient_id"])
    # no internal pseudonym in any exported frame
    for frame in (res.patients, res.observations, res.outcomes):
        assert frame is not None and not frame.isin(set(patients["patient_id"])).any().any()
    # each patient's observations and follow-up shifted by the same whole number of days
    for pid in consented["patient_id"][:10]:
        rid = research_id(pid, TEST_KEY)
        shift = pd.Timedelta(days=date_shift_days(pid, TEST_KEY, 182))
        o_in = obs[obs["patient_id"] == pid]["time"].sort_values().reset_index(drop=True)
        o_out = res.observations[res.observations["research_id"] == rid]["time"].reset_index(
            drop=True
        )
        pd.testing.assert_series_equal(o_out - shift, o_in, check_names=False)
        p_in = patients.set_index("patient_id").loc[pid]
        p_out = res.patients.set_index("research_id").loc[rid]
        assert p_out["followup_start"] - shift == p_in["followup_start"]
        assert p_out["followup_end"] - p_out["followup_start"] == pd.Timedelta(days=10)
    # same key, same export
    again = build_export(obs, patients, outcomes, ExportConfig(k=5), TEST_KEY)
    pd.testing.assert_frame_equal(again.observations, res.observations)


def test_refuses_below_k() -> None:
    obs, patients, outcomes = make_cohort()
    patients.loc[patients.index[1], "age"] = 95.0  # a lone 90+ patient (index 1 consents)
    with pytest.raises(ExportRefused, match=r"k-anonymity 1 < k=5.*age_band=90\+"):
        build_export(obs, patients, outcomes, ExportConfig(k=5), TEST_KEY)
    with pytest.raises(ExportRefused, match="k-anonymity"):
        build_export(obs, make_cohort()[1], None, ExportConfig(k=20), TEST_KEY)
    with pytest.raises(ExportRefused, match="lacks column"):
        build_export(
            obs, patients, None, ExportConfig(patient_columns=["sex", "cm_diabetes"]), TEST_KEY
        )


def test_config_forbids_raw_columns() -> None:
    with pytest.raises(ValueError, match="may not include"):
        ExportConfig(patient_columns=["age"])


def test_cli_export_writes_and_audits(cohort_dir: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("export:\n  k: 5\n  max_shift_days: 30\n")
    out = tmp_path / "research"
    rc = main(
        ["export", "--observations", str(cohort_dir), "--out", str(out), "--params", str(params)]
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "observations.parquet",
        "outcomes.parquet",
        "patients.parquet",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["k_achieved"] >= 5
    log = AuditLog()
    entries = list(log.entries())
    assert (
        entries[-1]["action"] == "export" and len(entries[-1]["patients"]) == manifest["patients"]
    )
    assert log.verify().ok
    # non-empty out without --overwrite: refused
    assert (
        main(
            [
                "export",
                "--observations",
                str(cohort_dir),
                "--out",
                str(out),
                "--params",
                str(params),
            ]
        )
        == 2
    )


def test_cli_refuses_below_k_writes_nothing(
    cohort_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("export:\n  k: 5\n")
    out = tmp_path / "research"
    rc = main(
        [
            "export",
            "--observations",
            str(cohort_dir),
            "--out",
            str(out),
            "--params",
            str(params),
            "--k",
            "100",
        ]
    )
    assert rc == 2
    assert "export refused: k-anonymity" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".research")]
    entries = list(AuditLog().entries())
    assert entries[-1]["action"] == "export_refused"


def test_cli_bad_params_key(
    cohort_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("export:\n  kk: 5\n")
    rc = main(
        [
            "export",
            "--observations",
            str(cohort_dir),
            "--out",
            str(tmp_path / "o"),
            "--params",
            str(params),
        ]
    )
    assert rc == 2 and "export.kk: unknown key" in capsys.readouterr().err
