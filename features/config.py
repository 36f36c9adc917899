"""Typed params for the ``features`` stage (section ``features`` of ``params.yaml``).

Which features exist is configuration: the observation codes come from the vocabulary (so a
new lab in ``config/vocabulary.yaml`` gets features without a code change), and each feature
family (``features/families/``) owns its own params section: ``windows``, ``baseline``,
``news2``, ``missingness``, ``static``, ... are validated by the model that family declares.
A new family brings its section with it; this file does not change. ``families`` switches
families on and off by name (all on by default). Unknown or misspelt keys, in the core fields
or in any family's section, are errors that name the key.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic_core import InitErrorDetails
from pydantic_core import ValidationError as CoreValidationError

Stat = Literal["mean", "min", "max", "std", "slope", "count", "sum"]
Kind = Literal["continuous", "binary", "ordinal", "count"]
Group = Literal["vital", "activity", "sleep", "lab"]


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


def _families() -> list[Any]:
    """The registered families (imported here, not at module import: they import us)."""
    from features.families import registered_families

    return registered_families()


def _error(kind: str, loc: tuple[Any, ...], value: Any, msg: str = "") -> InitErrorDetails:
    if kind == "value_error":
        return {"type": "value_error", "loc": loc, "input": value, "ctx": {"error": msg}}
    return {"type": kind, "loc": loc, "input": value}  # type: ignore[typeddict-item]


class FeaturesConfig(BaseModel):
    """The ``features`` section: core fields here, one extra section per feature family."""

    model_config = ConfigDict(extra="allow")

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
    #: family name -> on/off (families not named are on)
    families: dict[str, bool] = Field(default_factory=dict)
    #: dtype of the feature columns in the output
    dtype: Literal["float32", "float64"] = "float32"
    #: threads for the per-code work of the local backend (0 = one per CPU); results are
    #: identical for any value
    threads: int = Field(default=0, ge=0)

    @model_validator(mode="wrap")
    @classmethod
    def _family_sections(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Validate each family's own section with its model; reject unknown keys."""
        if not isinstance(data, dict):
            return handler(data)
        data = dict(data)
        errors: list[InitErrorDetails] = []
        sections: dict[str, tuple[Any, Any]] = {}
        for fam in _families():
            if fam.section and fam.section not in sections:
                sections[fam.section] = (fam.params_type, fam.params_default)
        for key in [k for k in data if k not in cls.model_fields]:
            if key not in sections:
                errors.append(_error("extra_forbidden", (key,), data.pop(key)))
        for key, (params_type, default) in sections.items():
            try:
                data[key] = TypeAdapter(params_type).validate_python(data.get(key, default))
            except ValidationError as exc:
                errors += [
                    {**e, "loc": (key, *e["loc"])}  # type: ignore[typeddict-item]
                    for e in exc.errors()
                ]
                data.pop(key)
        names = {fam.name for fam in _families()}
        for name in data.get("families") or {}:
            if name not in names:
                errors.append(_error("extra_forbidden", ("families", name), name))
        try:
            out = handler(data)
        except ValidationError as exc:
            errors += exc.errors()  # type: ignore[arg-type]
            out = None
        if out is not None and not errors:
            need = max([0.0, *(fam.lookback_needed(out) for fam in _families())])
            if out.lookback_hours < need:
                errors.append(
                    _error(
                        "value_error",
                        ("lookback_hours",),
                        out.lookback_hours,
                        f"lookback_hours ({out.lookback_hours:g}) must cover the longest "
                        f"window, baseline and NEWS2 age ({need:g} h)",
                    )
                )
        if errors:
            raise CoreValidationError.from_exception_data(cls.__name__, errors)
        return out

    def section(self, name: str) -> Any:
        """A family's params section (validated by that family's model)."""
        extra = self.__pydantic_extra__ or {}
        if name not in extra:
            raise KeyError(f"features has no section {name!r} (no registered family owns it)")
        return extra[name]

    def enabled(self, family: str) -> bool:
        return self.families.get(family, True)
