"""Ingestion of malformed input: quarantine, report and log messages name no raw identifier.

Bad rows are where identifiers escape: error messages like to say *whose* row was bad.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipelines.cli import main
from tests.governance.leakscan import scan

REPO = Path(__file__).resolve().parents[2]
RAW = "HOSP-7781"  # deliberately not the simulator's MRN-###### format

OBS = f"""patient_id,time,code,value,unit,source
{RAW},2026-01-05T10:00:00Z,heart_rate,88,/min,ward
{RAW},2026-01-05T11:00:00Z,heart_rate,abc,/min,ward
{RAW},2026-01-05T12:00:00Z,heart_rate,900,/min,ward
{RAW},notatime,heart_rate,80,/min,ward
{RAW},2026-01-05T13:00:00Z,no_such_code,1,/min,ward
"""
PATIENTS = "patient_id,setting,age,sex,followup_start,followup_end,consent_care,consent_model_training,consent_research\n"


def _ingest(
    tmp_path: Path,
    patients_row: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> list[str]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "ward.csv").write_text(OBS)
    (data / "patients.csv").write_text(PATIENTS + patients_row + "\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    caplog.set_level(logging.DEBUG)
    rc = main(
        ["ingest", str(data), "--out", str(tmp_path / "out"), "--params", str(tmp_path / "params.yaml"),
         "--vocabulary", str(REPO / "config" / "vocabulary.yaml"), "--quiet"]
    )  # fmt: skip
    assert rc == 0
    out, err = capsys.readouterr()
    (tmp_path / "out" / "console.txt").write_text(
        out + err + "\n".join(r.getMessage() for r in caplog.records)
    )
    return scan(tmp_path / "out", [RAW])


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITALRISK_PSEUDONYM_KEY", "ingest-privacy-key")


def test_bad_observation_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    hits = _ingest(
        tmp_path,
        f"{RAW},ward,70,F,2026-01-05T00:00:00Z,2026-01-10T00:00:00Z,true,true,true",
        capsys,
        caplog,
    )
    assert hits == []


def test_bad_patient_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    hits = _ingest(
        tmp_path,
        f"{RAW},ward,abc,F,not-a-time,2026-01-10T00:00:00Z,maybe,true,true",
        capsys,
        caplog,
    )
    assert hits == [], hits
