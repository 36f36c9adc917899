"""``simulate.hr_offset_bpm``: the wearable offset's size (the monitor's power curve varies it)."""

import numpy as np
import pandas as pd
import pytest

from simulate.cohort import simulate_cohort
from simulate.config import SimulateConfig


@pytest.fixture(scope="module")
def base() -> SimulateConfig:
    return SimulateConfig(n_patients=40, followup_days=(7, 8), seed=5)


def _home_hr(cfg: SimulateConfig) -> np.ndarray:
    c = simulate_cohort(cfg)
    home = set(c.patients.loc[c.patients["setting"] == "home", "patient_id"])
    o = c.observations
    return o[(o["code"] == "heart_rate") & o["patient_id"].isin(home)]["value"].to_numpy()


def test_offset_size_is_configurable_and_default_is_3(base):
    fresh = _home_hr(base)
    assert len(fresh) > 0
    for bpm in (3.0, 5.0):
        shifted = _home_hr(base.model_copy(update={"drift": "hr_offset", "hr_offset_bpm": bpm}))
        assert np.mean(shifted - fresh) == pytest.approx(bpm, abs=0.05)
    assert base.hr_offset_bpm == 3.0


def test_offset_size_does_not_touch_other_variants(base):
    a = simulate_cohort(base).observations
    b = simulate_cohort(base.model_copy(update={"hr_offset_bpm": 9.0})).observations
    pd.testing.assert_frame_equal(a, b)
