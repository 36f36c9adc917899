"""The model's own risk thresholds: fitted with it on the validation patients, logged with it.

Why: a band is only meaningful against the alert rate the model was budgeted for. ``high``
is the alert-budget threshold (``train.alert_budget_per_100_patient_days``: the lowest
calibrated probability whose alerts stay within the budget on validation patients), so "high"
and "alert" are the same decision. ``low`` is the threshold of the wider
``train.watch_budget_per_100_patient_days`` (patients worth a closer look), never above
``high``. Both travel inside the logged model (``RiskModel.metadata["thresholds"]``), so the
self-contained model carries them, and as run params (``thresholds.low`` / ``.high``).

One rule, one home: :func:`band_of` is the only place a probability becomes a band.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from models.metrics import Exposure, threshold_for_budget

#: key of the thresholds in ``RiskModel.metadata``
METADATA_KEY = "thresholds"
BANDS = ("low", "medium", "high")


@dataclass(frozen=True)
class Thresholds:
    """``p < low``: low; ``low <= p < high``: medium; ``p >= high``: high (= alert)."""

    low: float
    high: float
    alert_budget_per_100: float
    watch_budget_per_100: float
    unit: str
    fitted_on: str = "validation patients"

    def __post_init__(self) -> None:
        if not (0.0 <= self.low <= self.high <= 1.0 + 1e-12):
            raise ValueError(
                f"thresholds must satisfy 0 <= low <= high <= 1 ({self.low}, {self.high})"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Thresholds:
        return cls(
            low=float(doc["low"]),
            high=float(doc["high"]),
            alert_budget_per_100=float(doc["alert_budget_per_100"]),
            watch_budget_per_100=float(doc["watch_budget_per_100"]),
            unit=str(doc.get("unit") or ""),
            fitted_on=str(doc.get("fitted_on") or "validation patients"),
        )


def fit_thresholds(
    probabilities: np.ndarray,
    exposure: Exposure,
    alert_budget_per_100: float,
    watch_budget_per_100: float,
) -> Thresholds:
    """Thresholds of calibrated validation probabilities for the two budgets."""
    if watch_budget_per_100 < alert_budget_per_100:
        raise ValueError(
            f"train.watch_budget_per_100_patient_days ({watch_budget_per_100}) must be at least "
            f"the alert budget ({alert_budget_per_100})"
        )
    p = np.asarray(probabilities, dtype=float)
    high = threshold_for_budget(p, exposure, alert_budget_per_100)
    low = min(threshold_for_budget(p, exposure, watch_budget_per_100), high)
    return Thresholds(
        low=float(low),
        high=float(min(high, 1.0)),
        alert_budget_per_100=float(alert_budget_per_100),
        watch_budget_per_100=float(watch_budget_per_100),
        unit=exposure.unit,
    )


def band_of(p: float, t: Thresholds) -> str:
    """The model's band of a calibrated probability."""
    if p >= t.high:
        return "high"
    if p >= t.low:
        return "medium"
    return "low"


def model_thresholds(metadata: Mapping[str, Any] | None) -> Thresholds | None:
    """The thresholds a logged model carries (None for a model trained before they were)."""
    doc = (metadata or {}).get(METADATA_KEY)
    if not isinstance(doc, Mapping):
        return None
    try:
        return Thresholds.from_dict(doc)
    except (KeyError, TypeError, ValueError):
        return None
