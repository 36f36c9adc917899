"""Typed params of the ``simulate`` section of ``params.yaml``: the synthetic cohort."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DRIFT_KINDS = ("none", "hr_offset", "older", "spo2_missing")


class SimulateConfig(BaseModel):
    """Synthetic cohort: size, follow-up, event rate and the share sent to each source system."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 42
    n_patients: int = Field(500, ge=1, le=100_000)
    start: str = "2026-01-05T00:00:00Z"
    #: admissions spread over this many days from ``start``
    enrolment_days: int = Field(60, ge=1)
    followup_days: tuple[float, float] = (7.0, 30.0)
    home_fraction: float = Field(0.45, ge=0, le=1)
    #: target share of patients with a deterioration event (the risk model is calibrated to it)
    event_rate: float = Field(0.14, ge=0, le=0.5)
    #: share of events that come without a physiological prodrome
    silent_event_fraction: float = Field(0.15, ge=0, le=1)
    #: share of ward patients exported by each system (the rest go to the long CSV)
    ward_fhir_fraction: float = Field(0.15, ge=0, le=1)
    ward_psv_fraction: float = Field(0.2, ge=0, le=1)
    #: share of home patients in the wide wearable export (the rest go to the long CSV)
    home_wide_fraction: float = Field(0.6, ge=0, le=1)
    #: wearable sampling interval in minutes: each patient's device gets one of these
    wearable_intervals_min: list[int] = Field(default_factory=lambda: [1, 5, 10, 15])
    wearable_interval_weights: list[float] = Field(default_factory=lambda: [0.02, 0.13, 0.4, 0.45])
    #: fraction of raw records turned into bad records (quarantine material) per file
    bad_record_rate: float = Field(0.002, ge=0, le=0.2)
    duplicate_rate: float = Field(0.003, ge=0, le=0.2)
    consent_model_training: float = Field(0.92, ge=0, le=1)
    consent_research: float = Field(0.8, ge=0, le=1)
    drift: Literal["none", "hr_offset", "older", "spo2_missing"] = "none"
    #: ``drift: hr_offset``: bpm added to every home-wearable heart-rate reading (the
    #: monitor's power curve varies it; 3 is the default variant)
    hr_offset_bpm: float = Field(3.0, ge=-50, le=50)

    @model_validator(mode="after")
    def _check(self) -> SimulateConfig:
        lo, hi = self.followup_days
        if not 1 <= lo <= hi:
            raise ValueError("followup_days must be [min, max] with 1 <= min <= max")
        if len(self.wearable_intervals_min) != len(self.wearable_interval_weights):
            raise ValueError(
                "wearable_intervals_min and wearable_interval_weights differ in length"
            )
        if self.ward_fhir_fraction + self.ward_psv_fraction > 1:
            raise ValueError("ward_fhir_fraction + ward_psv_fraction must be <= 1")
        return self
