"""Scoring logic behind the HTTP API, independent of BentoML so it is testable in-process.

Raw observations are validated and converted with the vocabulary, turned into features by the
*training* feature code (``features.build.compute_features``), scored by the registered
``RiskModel`` and explained with LightGBM's own SHAP contributions in clinician words.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from features.vocabulary import Vocabulary
from governance.pseudonym import get_key, pseudonymise
from serving.config import ServeConfig
from serving.schemas import Contribution, ObservationIn, PatientIn

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """Client error with a location per problem (422; 413 for size limits)."""

    def __init__(self, problems: list[tuple[str, str]], status: int = 422) -> None:
        self.problems = problems
        self.status = status
        first = "; ".join(f"{loc}: {msg}" for loc, msg in problems[:3])
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        super().__init__(first + more)


@dataclass
class LoadedModel:
    """A registry version plus the unwrapped ``RiskModel`` and a fast float-matrix path."""

    name: str
    version: str
    alias: str | None
    run_id: str | None
    model: Any  # models.pyfunc.RiskModel
    feature_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.feature_names = list(self.model.feature_names)
        self._index = {n: i for i, n in enumerate(self.feature_names)}
        self._cats = {
            n: {c: float(i) for i, c in enumerate(cats)}
            for n, cats in (getattr(self.model, "categories", None) or {}).items()
        }

    def matrix(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Rows of ``{feature: value}`` -> float matrix in training order (missing -> NaN).

        Encodes categorical strings exactly like ``RiskModel.prepare`` (unknown -> NaN).
        """
        names, cats = self.feature_names, self._cats
        table = [[row.get(n) for n in names] for row in rows]
        try:
            return np.array(table, dtype=float).reshape(len(rows), len(names))  # None -> NaN
        except (TypeError, ValueError):
            pass  # text (categorical) values: encode cell by cell
        X = np.full((len(rows), len(names)), np.nan, dtype=float)
        for r, values in enumerate(table):
            for j, v in enumerate(values):
                if v is None:
                    continue
                if isinstance(v, str):
                    lookup = cats.get(names[j])
                    if lookup is not None:
                        X[r, j] = lookup.get(v, np.nan)
                    else:
                        try:
                            X[r, j] = float(v)
                        except ValueError:
                            X[r, j] = np.nan
                else:
                    X[r, j] = float(v)
        return X

    def predict_matrix(self, X: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for a prepared matrix (single-threaded: small batches)."""
        raw = self.model.booster.predict(X, raw_score=True, num_threads=1)
        return np.asarray(self.model.calibrator.transform(np.asarray(raw, dtype=float)))

    def contributions_matrix(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.booster.predict(X, pred_contrib=True, num_threads=1))


# ---------------------------------------------------------------------------------------------
# feature dictionary -> clinician words


@dataclass(frozen=True)
class FeatureText:
    definition: str
    unit: str


def load_feature_texts(
    dictionary: Mapping[str, Any] | None, feature_names: Sequence[str], vocab: Vocabulary
) -> dict[str, FeatureText]:
    """Definitions per feature from the feature dictionary, else built from the vocabulary."""
    out: dict[str, FeatureText] = {}
    try:
        for item in (dictionary or {}).get("features", []):
            out[str(item["name"])] = FeatureText(
                str(item.get("definition") or item["name"]), str(item.get("unit") or "")
            )
    except (KeyError, TypeError, AttributeError) as exc:
        logger.warning("unreadable feature dictionary (%s); using names", exc)
    for name in feature_names:
        if name not in out:
            out[name] = _fallback_text(name, vocab)
    return out


def _fallback_text(name: str, vocab: Vocabulary) -> FeatureText:
    for key in sorted(vocab.codes, key=len, reverse=True):
        if name == key or name.startswith(key + "_"):
            spec = vocab.codes[key]
            rest = name[len(key) :].strip("_").replace("_", " ")
            display = spec.display.split(" (")[0]
            return FeatureText(f"{display}, {rest}" if rest else display, spec.unit)
    if name == "news2_total":
        return FeatureText("NEWS2 total score", "")
    if name == "age":
        return FeatureText("Age", "years")
    if name == "sex_f":
        return FeatureText("Female sex", "")
    return FeatureText(name.replace("_", " ").capitalize(), "")


def _fmt_value(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    v = float(value)
    text = f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"
    u = unit if unit not in ("", "1", "{score}") else ""
    return f"{text} {u}".strip()


def explain(
    feature_names: Sequence[str],
    values: np.ndarray,
    contribs: np.ndarray,
    texts: Mapping[str, FeatureText],
    top_k: int,
) -> list[Contribution]:
    """Top ``top_k`` features by |SHAP| (bias column excluded), each with a sentence."""
    shap = contribs[: len(feature_names)]
    order = np.argsort(-np.abs(shap))[:top_k]
    out: list[Contribution] = []
    for j in order:
        c = float(shap[j])
        if c == 0.0:
            continue
        name = feature_names[j]
        t = texts.get(name) or FeatureText(name, "")
        v = values[j]
        val = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
        verb = "raised" if c > 0 else "lowered"
        out.append(
            Contribution(
                feature=name,
                value=val,
                contribution=round(c, 4),
                text=f"{t.definition} ({_fmt_value(val, t.unit)}) {verb} risk",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# raw observations -> canonical long frame


@dataclass
class PreparedPatient:
    pseudonym: str
    as_of: datetime
    observations: list[dict[str, Any]]
    covariates: dict[str, Any]
    warnings: list[str]


@lru_cache(maxsize=1)
def _key() -> bytes:
    """The pseudonym key, read once per process (``get_key`` warns when it is the demo key)."""
    return get_key()


@lru_cache(maxsize=200_000)
def pseudonym_of(patient_id: str) -> str:
    """Pseudonym of an incoming id (ids that already are pseudonyms pass through)."""
    return pseudonymise(patient_id, _key())


def canonical_observation(
    obs: ObservationIn, vocab: Vocabulary, latest: datetime
) -> tuple[dict[str, Any] | None, list[tuple[str, str]], str | None]:
    """(row, errors, warning): errors make the request a 422; a warning drops the row."""
    errors: list[tuple[str, str]] = []
    key = vocab.resolve_code(obs.code)
    if key is None:
        errors.append(
            ("code", f"unknown code {obs.code!r}: expected a vocabulary key or LOINC code")
        )
        return None, errors, None
    t = obs.time.astimezone(UTC)
    if t > latest:
        errors.append(
            (
                "time",
                f"{obs.time.isoformat()} is in the future (server time {latest:%Y-%m-%dT%H:%M}Z + tolerance)",
            )
        )
    try:
        value = vocab.to_canonical(key, obs.value, obs.unit)
    except ValueError as exc:
        field_name = "unit" if str(exc).startswith("unit") else "value"
        errors.append((field_name, str(exc)))
        return None, errors, None
    if errors:
        return None, errors, None
    bad = vocab.check_range(key, value)
    if bad:
        return None, [], f"{bad}: ignored"
    row = {"time": t, "code": key, "value": float(value), "source": obs.source or "api"}
    return row, [], None


def prepare_patients(
    patients: Sequence[PatientIn],
    vocab: Vocabulary,
    config: ServeConfig,
    now: datetime | None = None,
) -> list[PreparedPatient]:
    """Validate and canonicalise every patient; raise ``InputError`` listing all problems."""
    now = now or datetime.now(UTC)
    latest = now + timedelta(minutes=config.future_tolerance_minutes)
    problems: list[tuple[str, str]] = []
    out: list[PreparedPatient] = []
    seen: set[str] = set()
    for i, p in enumerate(patients):
        loc = f"patients[{i}]"
        if len(p.observations) > config.max_observations_per_patient:
            raise InputError(
                [
                    (
                        f"{loc}.observations",
                        f"{len(p.observations)} observations; at most {config.max_observations_per_patient} per patient",
                    )
                ],
                status=413,
            )
        try:
            cms = p.covariates.comorbidities()
        except ValueError as exc:
            problems.append((loc, str(exc)))
            continue
        rows: list[dict[str, Any]] = []
        warnings: list[str] = []
        for j, obs in enumerate(p.observations):
            row, errs, warn = canonical_observation(obs, vocab, latest)
            problems.extend((f"{loc}.observations[{j}].{f}", m) for f, m in errs)
            if warn:
                warnings.append(f"observations[{j}]: {warn}")
            if row is not None:
                rows.append(row)
        if p.as_of is not None:
            as_of = p.as_of.astimezone(UTC)
            if as_of > latest:
                problems.append((f"{loc}.as_of", "prediction time is in the future"))
        elif rows:
            as_of = max(r["time"] for r in rows)
        else:
            as_of = now
        later = sum(1 for r in rows if r["time"] > as_of)
        if later:
            warnings.append(f"{later} observation(s) after as_of ignored")
        if p.covariates.age is None:
            warnings.append("age missing: scored with age unknown")
        if p.covariates.sex is None:
            warnings.append("sex missing: scored with sex unknown")
        try:
            pseud = pseudonym_of(p.patient_id)
        except RuntimeError as exc:  # production mode without a pseudonym key
            raise InputError([("server", str(exc))]) from None
        cov = {
            "age": p.covariates.age,
            "sex": p.covariates.sex,
            "setting": p.covariates.setting,
            **cms,
        }
        if pseud in seen:
            problems.append((f"{loc}.patient_id", "the same patient appears twice in one request"))
            continue
        seen.add(pseud)
        out.append(PreparedPatient(pseud, as_of, rows, cov, warnings))
    if problems:
        raise InputError(problems)
    return out


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _utc_ns(values: Sequence[datetime]) -> pd.DatetimeIndex:
    """Aware datetimes -> UTC ns index, exactly (integer microseconds, no object parsing)."""
    ns = np.array([(t - _EPOCH) // _MICROSECOND * 1000 for t in values], dtype=np.int64)
    return pd.DatetimeIndex(ns.view("datetime64[ns]"), dtype="datetime64[ns, UTC]")


def frames_for(
    prepared: Sequence[PreparedPatient],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(observations, patients, times) in the data-contract shapes for ``compute_features``.

    Observations are sorted by (patient_id, time, code), stably; built column-wise from numpy
    arrays, which for one patient costs a fraction of a frame from a list of dicts.
    """
    obs_rows = sorted(
        (
            (p.pseudonym, r["time"], r["code"], float(r["value"]), r["source"])
            for p in prepared
            for r in p.observations
            if r["time"] <= p.as_of
        ),
        key=lambda x: (x[0], x[1], x[2]),
    )
    cols = list(zip(*obs_rows, strict=True)) if obs_rows else [(), (), (), (), ()]
    obs = pd.DataFrame(
        {
            "patient_id": np.array(cols[0], dtype=object),
            "time": _utc_ns(cols[1]),
            "code": np.array(cols[2], dtype=object),
            "value": np.array(cols[3], dtype=np.float64),
            "source": np.array(cols[4], dtype=object),
        }
    )
    pats: list[dict[str, Any]] = []
    for p in prepared:
        setting = p.covariates.get("setting") or _guess_setting(p.observations)
        row = {
            "patient_id": p.pseudonym,
            "setting": setting,
            "age": np.nan if p.covariates.get("age") is None else float(p.covariates["age"]),
            "sex": p.covariates.get("sex"),
            "followup_start": None,  # filled below, column-wise
            "followup_end": None,
            "consent_care": True,
            "consent_model_training": False,
            "consent_research": False,
        }
        row.update({k: v for k, v in p.covariates.items() if k.startswith("cm_")})
        pats.append(row)
    # column-wise, as a frame from records would have them (a missing cm_ key -> NaN)
    keys: dict[str, None] = {}
    for row in pats:
        keys.update(dict.fromkeys(row))
    columns: dict[str, Any] = {k: [row.get(k, np.nan) for row in pats] for k in keys}
    columns["followup_start"] = _utc_ns(
        [min(min((r["time"] for r in p.observations), default=p.as_of), p.as_of) for p in prepared]
    )
    columns["followup_end"] = _utc_ns([p.as_of for p in prepared])
    patients = pd.DataFrame(columns)
    times = pd.DataFrame(
        {
            "patient_id": [p.pseudonym for p in prepared],
            "time": _utc_ns([p.as_of for p in prepared]),
        }
    )
    return obs, patients, times


def _guess_setting(rows: Sequence[Mapping[str, Any]]) -> str:
    sources = {str(r.get("source")) for r in rows}
    return "home" if sources & {"home", "wearable"} else "ward"


def missing_warnings(vocab: Vocabulary, prepared: PreparedPatient) -> list[str]:
    """Warn about core vitals with no observation at all (the score leans on the others)."""
    have = {r["code"] for r in prepared.observations}
    core = ["resp_rate", "spo2", "o2_support", "sbp", "heart_rate", "body_temp", "consciousness"]
    missing = [
        vocab.codes[c].display.split(" (")[0] for c in core if c in vocab.codes and c not in have
    ]
    return [f"no recent {m.lower()}: treated as missing" for m in missing]
