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
from serving.schemas import Contribution, PatientIn

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
    """One patient's accepted observations in canonical units, as arrays in request order."""

    pseudonym: str
    as_of: datetime
    time_ns: np.ndarray  # int64, UTC nanoseconds
    codes: np.ndarray  # object: vocabulary keys
    values: np.ndarray  # float64, canonical unit
    sources: np.ndarray  # object
    covariates: dict[str, Any]
    warnings: list[str]

    @property
    def n_observations(self) -> int:
        return len(self.time_ns)


@lru_cache(maxsize=1)
def _key() -> bytes:
    """The pseudonym key, read once per process (``get_key`` warns when it is the demo key)."""
    return get_key()


@lru_cache(maxsize=200_000)
def pseudonym_of(patient_id: str) -> str:
    """Pseudonym of an incoming id (ids that already are pseudonyms pass through)."""
    return pseudonymise(patient_id, _key())


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
#: what datetime64[ns] can hold (years 1678 to 2261)
_NS_MIN, _NS_MAX = -(2**63) + 1, 2**63 - 1


def _ns_of(t: datetime) -> int:
    """Aware datetime -> UTC nanoseconds, exactly (integer microseconds)."""
    return (t - _EPOCH) // _MICROSECOND * 1000


def _canonical_values(
    vocab: Vocabulary,
    key: str,
    unit: str | None,
    raw: list[float | str],
) -> tuple[np.ndarray, list[str | None]]:
    """(canonical values, error per value or None) for one (code, unit) group.

    Numbers go through the unit conversion in one numpy expression (the same IEEE operations
    as ``Vocabulary.to_canonical`` per value); text values (categories) one at a time.
    """
    out = np.full(len(raw), np.nan)
    errors: list[str | None] = [None] * len(raw)
    spec = vocab.codes[key]
    u = spec.unit if unit is None or str(unit).strip() == "" else str(unit).strip()
    conv = spec.units.get(u)
    num = [i for i, v in enumerate(raw) if not isinstance(v, str)]
    if num and conv is not None:
        v = np.fromiter((raw[i] for i in num), dtype=np.float64, count=len(num))
        if conv.threshold is not None:
            out[num] = np.where(v > conv.threshold, 1.0, 0.0)
        else:
            out[num] = v * conv.scale + conv.offset
    for i, value in enumerate(raw):
        if conv is not None and not isinstance(value, str):
            continue  # converted above
        try:
            out[i] = vocab.to_canonical(key, value, unit)
        except ValueError as exc:
            errors[i] = str(exc)
    return out, errors


def _prepare_one(
    loc: str, p: PatientIn, vocab: Vocabulary, now: datetime, latest: datetime
) -> tuple[PreparedPatient | None, list[tuple[str, str]]]:
    """Canonical arrays and warnings for one patient, or the problems that make it a 422."""
    obs = p.observations
    n = len(obs)
    problems: list[tuple[int, int, str, str]] = []  # (observation, order, loc, message)
    warn_at: list[tuple[int, str]] = []
    ns = [_ns_of(o.time) for o in obs]
    bad = [j for j, x in enumerate(ns) if not _NS_MIN <= x <= _NS_MAX]
    if bad:
        return None, [
            (
                f"{loc}.observations[{j}].time",
                f"{obs[j].time.isoformat()} is outside the supported range (years 1678 to 2261)",
            )
            for j in bad
        ]
    t_ns = np.array(ns, dtype=np.int64)
    latest_ns = _ns_of(latest)
    keys = np.empty(n, dtype=object)
    values = np.full(n, np.nan)
    ok = np.zeros(n, dtype=bool)
    groups: dict[tuple[str, str | None], list[int]] = {}
    for j, o in enumerate(obs):
        groups.setdefault((o.code, o.unit), []).append(j)
    future = t_ns > latest_ns
    for (code, unit), idx in groups.items():
        key = vocab.resolve_code(code)
        if key is None:
            msg = f"unknown code {code!r}: expected a vocabulary key or LOINC code"
            problems.extend((j, 0, f"{loc}.observations[{j}].code", msg) for j in idx)
            continue
        conv, errs = _canonical_values(vocab, key, unit, [obs[j].value for j in idx])
        lo, hi = vocab.codes[key].range
        for k, j in enumerate(idx):
            if future[j]:
                problems.append(
                    (
                        j,
                        1,
                        f"{loc}.observations[{j}].time",
                        f"{obs[j].time.isoformat()} is in the future "
                        f"(server time {latest:%Y-%m-%dT%H:%M}Z + tolerance)",
                    )
                )
            err = errs[k]
            if err is not None:
                field_name = "unit" if err.startswith("unit") else "value"
                problems.append((j, 2, f"{loc}.observations[{j}].{field_name}", err))
                continue
            if future[j]:
                continue
            v = conv[k]
            if not lo <= v <= hi:
                warn_at.append((j, f"observations[{j}]: {vocab.check_range(key, v)}: ignored"))
                continue
            keys[j] = key
            values[j] = v
            ok[j] = True
    if problems:
        problems.sort(key=lambda x: (x[0], x[1]))
        return None, [(where, msg) for _, _, where, msg in problems]
    warnings = [w for _, w in sorted(warn_at)]
    sel = np.flatnonzero(ok)
    if p.as_of is not None:
        as_of = p.as_of.astimezone(UTC)
        if as_of > latest:
            return None, [(f"{loc}.as_of", "prediction time is in the future")]
        if not _NS_MIN <= _ns_of(as_of) <= _NS_MAX:
            return None, [(f"{loc}.as_of", "outside the supported range (years 1678 to 2261)")]
    elif len(sel):
        as_of = obs[int(sel[np.argmax(t_ns[sel])])].time.astimezone(UTC)
    else:
        as_of = now
    later = int((t_ns[sel] > _ns_of(as_of)).sum())
    if later:
        warnings.append(f"{later} observation(s) after as_of ignored")
    prepared = PreparedPatient(
        pseudonym="",
        as_of=as_of,
        time_ns=t_ns[sel],
        codes=keys[sel],
        values=values[sel],
        sources=np.array([obs[j].source or "api" for j in sel.tolist()], dtype=object),
        covariates={},
        warnings=warnings,
    )
    return prepared, []


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
        prepared, errs = _prepare_one(loc, p, vocab, now, latest)
        if prepared is None:
            problems.extend(errs)
            continue
        if p.covariates.age is None:
            prepared.warnings.append("age missing: scored with age unknown")
        if p.covariates.sex is None:
            prepared.warnings.append("sex missing: scored with sex unknown")
        try:
            prepared.pseudonym = pseudonym_of(p.patient_id)
        except RuntimeError as exc:  # production mode without a pseudonym key
            raise InputError([("server", str(exc))]) from None
        prepared.covariates = {
            "age": p.covariates.age,
            "sex": p.covariates.sex,
            "setting": p.covariates.setting,
            **cms,
        }
        if prepared.pseudonym in seen:
            problems.append((f"{loc}.patient_id", "the same patient appears twice in one request"))
            continue
        seen.add(prepared.pseudonym)
        out.append(prepared)
    if problems:
        raise InputError(problems)
    return out


def frames_for(
    prepared: Sequence[PreparedPatient],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(observations, patients, times) in the data-contract shapes for ``compute_features``.

    ``prepared`` holds at least one patient. Observations up to each patient's ``as_of``,
    sorted by (patient_id, time, code), stably; ``patient_id`` and ``code`` as categoricals
    (the feature code's fast path), built from numpy arrays: for a few patients a frame from
    a list of dicts would cost more than the features themselves.
    """
    pids = [p.pseudonym for p in prepared]
    pid_cats = sorted(set(pids))
    pid_rank = {pid: i for i, pid in enumerate(pid_cats)}
    as_of_ns = [_ns_of(p.as_of) for p in prepared]
    keep = [p.time_ns <= a for p, a in zip(prepared, as_of_ns, strict=True)]
    t_ns = np.concatenate([p.time_ns[k] for p, k in zip(prepared, keep, strict=True)])
    codes = np.concatenate([p.codes[k] for p, k in zip(prepared, keep, strict=True)])
    values = np.concatenate([p.values[k] for p, k in zip(prepared, keep, strict=True)])
    sources = np.concatenate([p.sources[k] for p, k in zip(prepared, keep, strict=True)])
    p_idx = np.concatenate(
        [
            np.full(int(k.sum()), pid_rank[p.pseudonym], dtype=np.int32)
            for p, k in zip(prepared, keep, strict=True)
        ]
    )
    code_cats = sorted({str(c) for c in codes.tolist()})
    code_rank = {c: i for i, c in enumerate(code_cats)}
    c_idx = np.fromiter((code_rank[c] for c in codes.tolist()), dtype=np.int32, count=len(codes))
    order = np.lexsort((c_idx, t_ns, p_idx))
    obs = pd.DataFrame(
        {
            "patient_id": pd.Categorical.from_codes(p_idx[order], categories=pid_cats),
            "time": _ns_index(t_ns[order]),
            "code": pd.Categorical.from_codes(c_idx[order], categories=code_cats),
            "value": values[order],
            "source": sources[order],
        }
    )
    pats: list[dict[str, Any]] = []
    for p in prepared:
        setting = p.covariates.get("setting") or _guess_setting(p.sources)
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
    columns["followup_start"] = _ns_index(
        [
            min(int(p.time_ns.min()), a) if p.n_observations else a
            for p, a in zip(prepared, as_of_ns, strict=True)
        ]
    )
    columns["followup_end"] = _ns_index(as_of_ns)
    patients = pd.DataFrame(columns)
    times = pd.DataFrame({"patient_id": pids, "time": _ns_index(as_of_ns)})
    return obs, patients, times


def _ns_index(ns: Sequence[int] | np.ndarray) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(
        np.asarray(ns, dtype=np.int64).view("datetime64[ns]"), dtype="datetime64[ns, UTC]"
    )


def _guess_setting(sources: np.ndarray) -> str:
    return "home" if set(sources.tolist()) & {"home", "wearable"} else "ward"


def missing_warnings(vocab: Vocabulary, prepared: PreparedPatient) -> list[str]:
    """Warn about core vitals with no observation at all (the score leans on the others)."""
    have = set(prepared.codes.tolist())
    core = ["resp_rate", "spo2", "o2_support", "sbp", "heart_rate", "body_temp", "consciousness"]
    missing = [
        vocab.codes[c].display.split(" (")[0] for c in core if c in vocab.codes and c not in have
    ]
    return [f"no recent {m.lower()}: treated as missing" for m in missing]
