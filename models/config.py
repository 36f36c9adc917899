"""Typed params for the train, evaluate and register stages (``params.yaml`` sections).

``extra="forbid"`` everywhere: a misspelt key is an error naming the key, not a silent default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitConfig(_Strict):
    """Patient-disjoint split. ``temporal`` puts the patients who entered last in test."""

    method: Literal["patient", "temporal"] = "patient"
    test_size: float = Field(default=0.25, gt=0, lt=1)
    val_size: float = Field(
        default=0.2, gt=0, lt=1, description="fraction of the non-test patients"
    )


class TuningConfig(_Strict):
    enabled: bool = False
    n_trials: int = Field(default=20, ge=1)
    timeout_seconds: float | None = 600


class TrainConfig(_Strict):
    seed: int = 42
    num_threads: int = Field(default=1, ge=1)
    backend: Literal["local", "dask"] = "local"
    dask_scheduler: str | None = None
    dask_workers: int = Field(default=2, ge=1)
    experiment: str = "vitalrisk"
    features: list[str] = Field(default_factory=list)
    exclude_features: list[str] = Field(default_factory=list)
    categorical_features: list[str] = Field(default_factory=list)
    monotone_constraints: dict[str, Literal[-1, 0, 1]] = Field(default_factory=dict)
    split: SplitConfig = Field(default_factory=lambda: SplitConfig())
    cv_folds: int = Field(default=3, ge=0)
    learning_rate: float = Field(default=0.05, gt=0, le=1)
    num_leaves: int = Field(default=15, ge=2)
    max_depth: int = -1
    min_child_samples: int = Field(default=50, ge=1)
    feature_fraction: float = Field(default=0.8, gt=0, le=1)
    bagging_fraction: float = Field(default=0.8, gt=0, le=1)
    bagging_freq: int = Field(default=1, ge=0)
    lambda_l2: float = Field(default=1.0, ge=0)
    n_estimators: int = Field(default=500, ge=1)
    early_stopping_rounds: int = Field(default=30, ge=0)
    imbalance: Literal["none", "scale_pos_weight", "is_unbalance"] = "scale_pos_weight"
    calibration: Literal["sigmoid", "isotonic", "none"] = "sigmoid"
    alert_budget_per_100_patient_days: float = Field(default=10.0, gt=0)
    #: the wider budget whose threshold starts the "medium" band (``models.thresholds``)
    watch_budget_per_100_patient_days: float = Field(default=30.0, gt=0)
    #: rows LightGBM samples to place its bin boundaries (LightGBM's default is 200,000; the
    #: sample is copied as doubles while binning: 100,000 keeps that copy at ~375 MB for 312
    #: features; cohorts smaller than this are binned on every row either way)
    bin_sample_rows: int = Field(default=100_000, ge=1000)
    #: how the served model scores rows: ``tl2cgen`` compiles the trees (cached per model,
    #: used only after matching LightGBM exactly; LightGBM until then or if it cannot build),
    #: ``none`` scores with LightGBM. Recorded in the model's metadata.
    compiled_trees: Literal["tl2cgen", "none"] = "tl2cgen"
    cohort_horizon_days: float | None = Field(
        default=None,
        gt=0,
        description="one-row-per-patient cohort input: label = event within this many days "
        "(columns time_to_event_days, event; censored before the horizon excluded)",
    )
    tuning: TuningConfig = Field(default_factory=lambda: TuningConfig())

    @model_validator(mode="after")
    def _budgets(self) -> TrainConfig:
        if self.watch_budget_per_100_patient_days < self.alert_budget_per_100_patient_days:
            raise ValueError(
                "watch_budget_per_100_patient_days must be at least "
                "alert_budget_per_100_patient_days (the medium band starts below high)"
            )
        return self

    def lgb_params(self) -> dict[str, object]:
        """LightGBM parameters; deterministic given seed and ``num_threads``."""
        return {
            "objective": "binary",
            "metric": ["average_precision", "auc"],
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "max_depth": self.max_depth,
            "min_child_samples": self.min_child_samples,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq,
            "lambda_l2": self.lambda_l2,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": self.num_threads,
            "bin_construct_sample_cnt": self.bin_sample_rows,
            "verbosity": -1,
        }


class EvaluateConfig(_Strict):
    bootstrap_reps: int = Field(default=200, ge=0)
    seed: int = 42
    news2_thresholds: list[float] = Field(default_factory=lambda: [5.0, 7.0])
    age_bands: list[float] = Field(
        default_factory=lambda: [0.0, 50.0, 65.0, 80.0, 130.0],
        description="edges of the age bands used for subgroup metrics",
    )
    calibration_bins: int = Field(default=10, ge=2)
    subgroup_bootstrap_reps: int = Field(
        default=100, ge=0, description="patient bootstrap reps for subgroup AUROC/AUPRC CIs"
    )
    subgroup_min_events: int = Field(
        default=5, ge=0, description="below this, subgroup AUROC is null"
    )

    @model_validator(mode="after")
    def _bands_sorted(self) -> EvaluateConfig:
        if sorted(self.age_bands) != self.age_bands or len(self.age_bands) < 2:
            raise ValueError("age_bands must be at least two increasing edges")
        return self


class RegisterConfig(_Strict):
    model_name: str = "vitalrisk-deterioration"
    min_auprc_gain: float = Field(
        default=0.005, description="challenger AUPRC must exceed the champion's by at least this"
    )
    max_brier_increase: float = Field(
        default=0.0, ge=0, description="challenger Brier may exceed the champion's by at most this"
    )
    max_calibration_slope_error: float = Field(
        default=0.2,
        gt=0,
        description="|calibration slope - 1| on the test set must be within this (every model)",
    )
    require_beats_news2: bool = Field(
        default=True, description="test AUPRC must exceed NEWS2's on the same rows (every model)"
    )
    min_auroc_gain_ci_low: float | None = Field(
        default=0.0,
        description="the 95% patient-bootstrap interval of AUROC(model) - AUROC(NEWS2) must lie "
        "above this (every model); null = not checked",
    )
