"""Shared fixtures: small synthetic feature frames, prediction logs and a fast config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from core.vocabulary import Vocabulary, load_vocabulary
from monitoring import prediction_log as plog
from monitoring import synthetic as syn
from monitoring.config import MonitorConfig

#: vitals and windows of the test frames (heart rate and SpO2 are always there): 28 columns
CODES: tuple[str, ...] = ()
WINDOWS = (4, 24)
REF_ROWS = 10000
CUR_ROWS = 5000


def frame(n: int, seed: int, drift: str = "none") -> pd.DataFrame:
    return syn.feature_frame(n, seed=seed, drift=drift, codes=CODES, windows=WINDOWS)


@pytest.fixture(scope="session")
def vocab() -> Vocabulary:
    return load_vocabulary()


@pytest.fixture(scope="session")
def config() -> MonitorConfig:
    return MonitorConfig(reference_size=REF_ROWS, current_size=CUR_ROWS, chunk_rows=1000)


@pytest.fixture(scope="session")
def reference() -> pd.DataFrame:
    """Training features with the model's risk on them (``probability``)."""
    return frame(REF_ROWS, seed=1)


@pytest.fixture
def make_log(tmp_path: Path) -> Callable[..., Path]:
    """Write a prediction log of ``n`` rows drawn fresh with ``drift``; returns its path."""

    def make(
        drift: str = "none",
        seed: int = 2,
        n: int = CUR_ROWS,
        start: str = "2026-11-01",
        name: str = "predictions.sqlite",
        data: pd.DataFrame | None = None,
    ) -> Path:
        path = tmp_path / name
        cur = data if data is not None else frame(n, seed=seed, drift=drift)
        plog.write_predictions(path, syn.prediction_log_frame(cur, start, seed=seed))
        return path

    return make
