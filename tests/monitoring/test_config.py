from pathlib import Path

import pytest
from pydantic import ValidationError

from core.errors import UserError
from core.params import load_section
from monitoring.config import DriftTest, MonitorConfig

ROOT = Path(__file__).resolve().parents[2]


def test_params_yaml_monitor_section_loads():
    cfg = load_section(MonitorConfig, "monitor", ROOT / "params.yaml")
    assert cfg.drift.numerical.method in {"wasserstein", "ks"}
    assert cfg.drift.unit in {"row", "patient"}
    assert 0 < cfg.verdict.retrain_drift_share <= 1


def test_misspelt_key_is_named(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("monitor:\n  drift:\n    numerical: {method: ks, treshold: 0.01}\n")
    with pytest.raises(UserError, match=r"monitor\.drift\.numerical\.treshold: unknown key"):
        load_section(MonitorConfig, "monitor", p)


def test_unknown_method_rejected():
    with pytest.raises(ValidationError, match="unknown drift method"):
        DriftTest(method="wasserstien", threshold=0.1)


@pytest.mark.parametrize(
    ("method", "score", "drifted"),
    [
        ("wasserstein", 0.2, True),
        ("wasserstein", 0.05, False),
        ("ks", 0.001, True),
        ("ks", 0.5, False),
    ],
)
def test_direction_of_p_values_and_distances(method, score, drifted):
    threshold = 0.1 if method == "wasserstein" else 0.05
    assert DriftTest(method=method, threshold=threshold).drifted(score) is drifted
