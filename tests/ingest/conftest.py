"""Shared fixtures for ingestion tests: vocabulary, an ingest config like params.yaml, a key."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.vocabulary import Vocabulary, load_vocabulary
from ingest.config import IngestConfig, WideColumn

KEY = b"test-pseudonym-key"


@pytest.fixture(scope="session")
def vocab() -> Vocabulary:
    return load_vocabulary()


@pytest.fixture
def cfg() -> IngestConfig:
    return IngestConfig(
        missing_consent="include",
        wide_columns={
            "HR": WideColumn(code="heart_rate", unit="/min"),
            "SpO2": WideColumn(code="spo2", unit="%"),
            "TempF": WideColumn(code="body_temp", unit="[degF]"),
            "SleepMin": WideColumn(code="sleep_duration", unit="min"),
        },
    )


@pytest.fixture
def write(tmp_path: Path):
    """Write text (or bytes) into tmp_path/name and return the path."""

    def _write(name: str, content: str | bytes) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return p

    return _write


def balanced(report: dict) -> bool:
    t = report["totals"]
    return (
        report["balanced"]
        and t["read"]
        == t["accepted"]
        + t["quarantined"]
        + t["consent_excluded"]
        + t["duplicates"]
        + t["unmapped"]
    )
