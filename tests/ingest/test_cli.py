"""The ``vitalrisk ingest`` command: structural errors exit 2 with one line, outputs are pseudonymised."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines.cli import main

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["ingest", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("missing.csv", None, "not found"),
        ("obs.csv", "patient_id,time,value\nMRN-1,2026-01-01T00:00:00Z,80\n", "required column"),
        ("notes.xyz", "hello\n", "unknown format"),
        ("mystery.csv", "a,b,c\n1,2,3\n", "unknown format"),
        ("bundle.json", '{"resourceType": "Bundle", "entry": [', "not valid JSON"),
        ("psv/MRN-1.psv", "HR|O2Sat\n80|97\n", "required column 'ICULOS' absent"),
        ("empty.csv", "", "empty file"),
        ("utf16.csv", "patient_id,time,code,value\n".encode("utf-16"), "not valid UTF-8"),
    ],
)
def test_structural_errors_exit_2_naming_the_file(
    tmp_path, capsys, monkeypatch, name, content, expect
):
    monkeypatch.setenv("VITALRISK_PSEUDONYM_KEY", "k")
    p = tmp_path / name
    if content is not None:
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    target = p.parent if name.startswith("psv/") else p
    code, _, err = _run(
        capsys, str(target), "--out", str(tmp_path / "out"), "--params", str(PARAMS)
    )
    assert code == 2
    assert "Traceback" not in err
    assert str(target if not name.startswith("psv/") else p) in err
    assert expect in err
    assert err.count("\n") == 1  # one line


def test_ingest_cli_on_simulated_cohort(tmp_path, capsys, monkeypatch):
    """End to end on a tiny simulated cohort: balanced counts, no raw identifier anywhere."""
    monkeypatch.setenv("VITALRISK_PSEUDONYM_KEY", "test-key")
    data = tmp_path / "data"
    assert (
        main(
            [
                "simulate",
                "--out",
                str(data),
                "--n-patients",
                "12",
                "--seed",
                "7",
                "--params",
                str(PARAMS),
            ]
        )
        == 0
    )
    out = tmp_path / "obs"
    code, stdout, _ = _run(
        capsys,
        str(data),
        "--out",
        str(out),
        "--quarantine",
        str(tmp_path / "q"),
        "--report",
        str(tmp_path / "ingest.json"),
        "--params",
        str(PARAMS),
    )
    assert code == 0
    assert "balanced" in stdout
    report = json.loads((tmp_path / "ingest.json").read_text())
    t = report["totals"]
    assert (
        report["balanced"]
        and t["read"]
        == t["accepted"]
        + t["quarantined"]
        + t["consent_excluded"]
        + t["duplicates"]
        + t["unmapped"]
    )
    assert t["quarantined"] > 0 and t["unmapped"] > 0  # the simulator's unknown codes
    formats = {f["format"] for f in report["files"].values()}
    assert {
        "long_csv",
        "wide_csv",
        "fhir_ndjson",
        "psv",
        "patients",
        "outcomes",
        "cohort",
    } <= formats
    obs = pd.read_parquet(out / "observations.parquet")
    pats = pd.read_parquet(out / "patients.parquet")
    q = pd.read_parquet(tmp_path / "q" / "quarantine.parquet")
    assert list(obs.columns) == ["patient_id", "time", "code", "value", "source"]
    assert str(obs["time"].dtype) == "datetime64[ns, UTC]"
    assert obs["patient_id"].isin(pats["patient_id"]).all()
    assert pats["consent_model_training"].all()
    assert not obs.duplicated(["patient_id", "time", "code", "value"]).any()
    for frame in (
        obs,
        pats,
        pd.read_parquet(out / "outcomes.parquet"),
        pd.read_parquet(out / "cohort.parquet"),
        q,
    ):
        text = frame.astype(str).to_csv()
        assert "MRN-" not in text
    assert "MRN-" not in (tmp_path / "ingest.json").read_text()
    assert "MRN-" not in stdout
