"""Typed ``monitor`` section of ``params.yaml``.

Thresholds are effect sizes, not p-values, by default: with tens of thousands of logged
predictions every p-value test fires on clinically meaningless shifts, which is how monitors
drown their readers in false alarms.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from monitoring.stattests import P_VALUE_METHODS, TESTS


class DriftTest(BaseModel):
    """One Evidently stat test and its threshold."""

    model_config = ConfigDict(extra="forbid")
    method: str
    threshold: float = Field(gt=0)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in TESTS:
            raise ValueError(f"unknown drift method {v!r}: expected one of {sorted(TESTS)}")
        return v

    def drifted(self, score: float) -> bool:
        return TESTS[self.method].drifted(score, self.threshold)

    def severity(self, score: float) -> float:
        """How far past the threshold (> 1 = drifted), comparable across methods for ranking."""
        if self.method in P_VALUE_METHODS:
            return self.threshold / max(score, 1e-300)
        return score / self.threshold


class DriftConfig(BaseModel):
    """Drift test per column type; ``per_feature`` overrides by column name."""

    model_config = ConfigDict(extra="forbid")
    numerical: DriftTest = DriftTest(method="wasserstein", threshold=0.1)
    binary: DriftTest = DriftTest(method="jensenshannon", threshold=0.1)
    categorical: DriftTest = DriftTest(method="jensenshannon", threshold=0.1)
    prediction: DriftTest = DriftTest(method="wasserstein", threshold=0.1)
    per_feature: dict[str, DriftTest] = Field(default_factory=dict)
    #: Noise floor from the reference itself: split the reference's patients in random
    #: halves ``calibration_splits`` times and run the same tests between the halves. Rows of
    #: one patient are alike, so two cohorts of a few hundred patients differ by more than the
    #: row count suggests; a feature only drifts when its distance also exceeds
    #: ``noise_margin`` x the largest split-half distance (scaled to the two sample sizes).
    #: Distance methods only (p-values are taken as they are). 0 splits = off.
    calibration_splits: int = Field(default=3, ge=0, le=100)
    noise_margin: float = Field(default=1.5, ge=1.0)
    #: Sampling unit of the value-drift tests. ``row``: every prediction is a draw. ``patient``:
    #: each side's rows are first reduced to one row per patient (median of numerical features,
    #: first value of categorical ones), so a patient scored 50 times counts once and the tests
    #: and the noise floor see the honest sample size. Needs ``patient_id`` on both sides (else
    #: rows); missing shares are compared over rows either way.
    unit: Literal["row", "patient"] = "row"


class QualityConfig(BaseModel):
    """Data-quality thresholds on the current window (shares are fractions of rows)."""

    model_config = ConfigDict(extra="forbid")
    #: a feature whose missing share rises by more than this over the reference is flagged
    max_missing_increase: float = Field(default=0.10, ge=0, le=1)
    #: rise in the share of values outside the vocabulary's plausible range (vs the reference)
    max_out_of_range_share: float = Field(default=0.01, ge=0, le=1)
    #: share of rows whose categorical value never occurred in the reference
    max_new_category_share: float = Field(default=0.01, ge=0, le=1)
    #: feature-name tokens of level statistics, whose values live in the code's range
    #: (``heart_rate_mean_4h`` yes, ``heart_rate_std_4h`` no)
    range_stats: list[str] = Field(
        default_factory=lambda: ["last", "mean", "min", "max", "median", "baseline"]
    )


class PerformanceConfig(BaseModel):
    """Performance once outcomes have arrived; absolute floors on this model's metrics."""

    model_config = ConfigDict(extra="forbid")
    min_labelled: int = Field(default=200, ge=10)
    min_positives: int = Field(default=10, ge=1)
    warn_auroc: float = Field(default=0.75, ge=0, le=1)
    retrain_auroc: float = Field(default=0.70, ge=0, le=1)
    #: expected calibration error (10 equal-width bins)
    max_calibration_error: float = Field(default=0.05, ge=0, le=1)
    #: pandas offset alias for the over-time table (``1D``, ``7D``)
    period: str = "1D"
    #: patient/time outcomes: an event within the horizon after a prediction makes its label
    #: 1. Per care setting; the service logs the served model's own horizon with each
    #: prediction, which wins (these are for older logs without it)
    label_horizon_hours: dict[str, float] = Field(
        default_factory=lambda: {"ward": 24.0, "home": 168.0}
    )
    #: performance at this alert threshold when the served model's is unknown (null: none)
    alert_threshold: float | None = Field(default=None, gt=0, lt=1)

    @field_validator("label_horizon_hours", mode="before")
    @classmethod
    def _per_setting(cls, v: object) -> object:
        return {"*": v} if isinstance(v, int | float) else v


class VerdictConfig(BaseModel):
    """How drift, quality and performance findings map to ok / warn / retrain."""

    model_config = ConfigDict(extra="forbid")
    #: warn when at least this many features drift (value or missingness)
    warn_drifted_features: int = Field(default=1, ge=1)
    #: retrain when this share of monitored features drifts
    retrain_drift_share: float = Field(default=0.3, gt=0, le=1)
    #: retrain when the predicted risk drifts together with at least warn_drifted_features
    retrain_on_prediction_drift: bool = True


class MonitorConfig(BaseModel):
    """``params.yaml: monitor``."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    #: rows sampled from the training features as the reference
    reference_size: int = Field(default=20000, ge=100)
    #: rows sampled from the current window for the drift tests (quality shares use all rows)
    current_size: int = Field(default=20000, ge=100)
    #: the current window: the last ``window_days`` before the latest logged prediction
    window_days: float = Field(default=7.0, gt=0)
    #: rows read from the prediction log per chunk (bounds memory)
    chunk_rows: int = Field(default=25000, ge=1000)
    #: quality shares (missing, out of range, new categories) over every row of the window
    #: instead of the ``current_size`` sample: exact, but parses every logged row's JSON
    exact_quality: bool = False
    #: log role to monitor (shadow predictions are the challenger's)
    role: str = "champion"
    #: features shown with a drift widget in the HTML report (drifted first, then the closest
    #: to their threshold); every feature's test result is in the JSON summary
    report_columns: int = Field(default=30, ge=1)
    #: columns of the feature matrix that are not model inputs
    exclude: list[str] = Field(default_factory=lambda: ["patient_id", "time", "label"])
    drift: DriftConfig = Field(default_factory=DriftConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    verdict: VerdictConfig = Field(default_factory=VerdictConfig)
    #: also test drift within each value of these columns, e.g. ``[setting]`` (a wearable
    #: offset shows at home, diluted in the whole population); a feature drifts if it drifts
    #: overall or in a segment. Each segment adds one test per feature: keep p-value
    #: thresholds family-wise (params.yaml). Off by default in code
    segment_by: list[str] = Field(default_factory=list)
    #: segments with fewer units on either side are not tested on their own (units are
    #: patients when ``drift.unit`` is ``patient``, else rows)
    min_segment_units: int = Field(default=50, ge=10)
    #: below this many units in the window (patients when ``drift.unit`` is ``patient``, else
    #: rows) the verdict is ``insufficient_data`` (exit 3): no drift test means much on a
    #: handful of predictions
    min_units: int = Field(default=30, ge=1)
    #: Evidently workspace projects: the served model's monitoring, and the drift demo's
    #: simulated cohorts (kept apart so a demo never shows up in production's history)
    project: str = "vitalrisk-monitoring"
    demo_project: str = "vitalrisk-monitoring-demo"
