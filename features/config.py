"""Typed params for the ``features`` stage (section ``features`` of ``params.yaml``).

Which features exist is configuration: windows, statistics, families, baseline and static
covariates are set here; the observation codes come from the vocabulary, so a new lab in
``config/vocabulary.yaml`` gets features without a code change.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Stat = Literal["mean", "min", "max", "std", "slope", "count", "sum"]
Kind = Literal["continuous", "binary", "ordinal", "count"]
Group = Literal["vital", "activity", "sleep", "lab"]


_DEFAULT_WINDOWS: dict[Group, list[float]] = {
    "vital": [4.0, 12.0, 24.0, 72.0],
    "activity": [24.0, 72.0],
    "sleep": [72.0],
    "lab": [24.0, 72.0],
}
_DEFAULT_STATS: dict[Kind, list[Stat]] = {
    "continuous": ["mean", "min", "max", "std", "slope", "count"],
    "count": ["sum", "count"],
    "binary": ["mean", "max"],
    "ordinal": ["max"],
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DaskConfig(_Strict):
    """Where the Dask backend runs; env ``DASK_SCHEDULER_ADDRESS`` overrides the address."""

    #: ``tcp://host:8786`` of a running scheduler; None starts a LocalCluster
    scheduler_address: str | None = None
    #: patient partitions (tasks); each task reads its patients' rows from the Parquet input
    n_partitions: int = Field(default=8, ge=1)
    #: LocalCluster size when no scheduler address is given
    local_workers: int = Field(default=2, ge=1)

    def address(self) -> str | None:
        return os.environ.get("DASK_SCHEDULER_ADDRESS") or self.scheduler_address


class PredictionTimes(_Strict):
    """When a risk is predicted for a patient of one care setting.

    ``cadence``: every ``every_hours`` while monitored (follow-up start to end);
    ``each_observation``: at every distinct observation time (within follow-up);
    ``once``: one time per patient, ``offset_hours`` after follow-up start.
    """

    mode: Literal["cadence", "each_observation", "once"] = "cadence"
    every_hours: float = Field(default=1.0, gt=0)
    #: first time = follow-up start + offset (cadence, once); default: one cadence step
    offset_hours: float | None = Field(default=None, ge=0)


class LabelConfig(_Strict):
    #: horizon per setting: label 1 when a qualifying event falls in (t, t + horizon]
    horizon_hours: dict[str, float] = Field(default_factory=lambda: {"ward": 24.0, "home": 168.0})
    #: event types that count; an empty list means every event
    event_types: list[str] = Field(
        default_factory=lambda: ["icu_transfer", "rapid_response", "emergency_admission", "death"]
    )
    #: a time whose horizon runs past the end of follow-up without an event is unlabelled:
    #: ``exclude`` drops it (counted under ``partial_horizon``); it is never labelled negative
    partial_horizon: Literal["exclude"] = "exclude"


class WindowConfig(_Strict):
    #: trailing windows (hours, ending at the prediction time, (t - w, t]) per vocabulary group
    hours: dict[Group, list[float]] = Field(
        default_factory=lambda: {k: list(v) for k, v in _DEFAULT_WINDOWS.items()}
    )
    #: statistics per vocabulary kind (slope is per hour; std is the sample std)
    stats: dict[Kind, list[Stat]] = Field(
        default_factory=lambda: {k: list(v) for k, v in _DEFAULT_STATS.items()}
    )


class BaselineConfig(_Strict):
    """Personal baseline: trailing window lagged so that the recent past is not in it."""

    #: baseline window is (t - start_days, t - end_days]
    start_days: float = Field(default=7.0, gt=0)
    end_days: float = Field(default=1.0, ge=0)
    #: fewer observations than this in the baseline window -> baseline features missing
    min_count: int = Field(default=3, ge=1)
    #: the recent window compared with the baseline (mean over (t - compare_hours, t])
    compare_hours: float = Field(default=24.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> BaselineConfig:
        if self.end_days >= self.start_days:
            raise ValueError("baseline.end_days must be smaller than baseline.start_days")
        return self


class News2Config(_Strict):
    #: a latest value older than this is treated as not measured
    max_age_hours: float = Field(default=24.0, gt=0)
    #: patient covariates (truthy = hypercapnic respiratory failure) that select SpO2 scale 2
    scale2_flags: list[str] = Field(default_factory=lambda: ["spo2_scale2"])


class Families(_Strict):
    last: bool = True
    windows: bool = True
    baseline: bool = True
    news2: bool = True
    shock_index: bool = True
    activity: bool = True
    sleep: bool = True
    missingness: bool = True
    static: bool = True


class MissingnessConfig(_Strict):
    #: ``<code>_missing`` = no observation in (t - window_hours, t];
    #: ``<code>_per_hour`` = observations per hour in that window (measurement frequency)
    window_hours: float = Field(default=24.0, gt=0)


class FeaturesConfig(_Strict):
    backend: Literal["local", "dask"] = "local"
    dask: DaskConfig = Field(default_factory=lambda: DaskConfig())
    prediction_times: dict[str, PredictionTimes] = Field(
        default_factory=lambda: {
            "ward": PredictionTimes(mode="cadence", every_hours=1.0),
            "home": PredictionTimes(mode="cadence", every_hours=6.0),
        }
    )
    labels: LabelConfig = Field(default_factory=lambda: LabelConfig())
    #: vocabulary codes that get features: ``all`` or a list of keys
    codes: Literal["all"] | list[str] = "all"
    #: nothing older than this (hours before t) is used: serving must send at least this much
    lookback_hours: float = Field(default=168.0, gt=0)
    windows: WindowConfig = Field(default_factory=lambda: WindowConfig())
    baseline: BaselineConfig = Field(default_factory=lambda: BaselineConfig())
    news2: News2Config = Field(default_factory=lambda: News2Config())
    missingness: MissingnessConfig = Field(default_factory=lambda: MissingnessConfig())
    families: Families = Field(default_factory=lambda: Families())
    #: static covariates from the patient table; ``sex_f`` is derived from ``sex``;
    #: shell-style patterns (``cm_*``) expand against the patient columns
    static: list[str] = Field(default_factory=lambda: ["age", "sex_f", "cm_*"])
    #: dtype of the feature columns in the output
    dtype: Literal["float32", "float64"] = "float32"
    #: threads for the per-code work of the local backend (0 = one per CPU); results are
    #: identical for any value
    threads: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _lookback_covers(self) -> FeaturesConfig:
        longest = max([0.0, *(w for ws in self.windows.hours.values() for w in ws)])
        need = max(
            longest,
            self.baseline.start_days * 24,
            self.baseline.compare_hours,
            self.news2.max_age_hours,
            self.missingness.window_hours,
        )
        if self.lookback_hours < need:
            raise ValueError(
                f"lookback_hours ({self.lookback_hours:g}) must cover the longest window, "
                f"baseline and NEWS2 age ({need:g} h)"
            )
        return self
