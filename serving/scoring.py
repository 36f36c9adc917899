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
from typing import TYPE_CHECKING, Any

import numpy as np

from core.vocabulary import Vocabulary
from governance.pseudonym import get_key, pseudonymise
from serving.config import ServeConfig
from serving.schemas import Contribution, PatientIn

if TYPE_CHECKING:
    from features.build import FeatureInputs

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


@dataclass(frozen=True)
class _Rule:
    """How one request's (code, unit) pair becomes canonical: the vocabulary key (None when
    unknown), its unit conversion (None when the unit is not convertible) and its range."""

    key: str | None
    conv: Any  # core.vocabulary.UnitConversion | None
    lo: float
    hi: float


def _rule(vocab: Vocabulary, code: str, unit: str | None) -> _Rule:
    key = vocab.resolve_code(code)
    if key is None:
        return _Rule(None, None, np.nan, np.nan)
    spec = vocab.codes[key]
    u = spec.unit if unit is None or str(unit).strip() == "" else str(unit).strip()
    lo, hi = spec.range
    return _Rule(key, spec.units.get(u), float(lo), float(hi))


def _prepare_one(
    loc: str, p: PatientIn, vocab: Vocabulary, now: datetime, latest: datetime
) -> tuple[PreparedPatient | None, list[tuple[str, str]]]:
    """Canonical arrays and warnings for one patient, or the problems that make it a 422.

    One pass over the observations, then numpy per (code, unit): numbers are converted by the
    vocabulary's ``UnitConversion.apply_array``; text values, and units without a conversion,
    go through ``to_canonical`` one by one (its message names what was expected).
    """
    obs = p.observations
    n = len(obs)
    problems: list[tuple[int, int, str, str]] = []  # (observation, order, loc, message)
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
    future = t_ns > _ns_of(latest)
    # one rule per distinct (code, unit) of this patient
    pairs: dict[tuple[str, str | None], int] = {}
    gid = np.fromiter(
        (pairs.setdefault((o.code, o.unit), len(pairs)) for o in obs), dtype=np.intp, count=n
    )
    rules = [_rule(vocab, code, unit) for code, unit in pairs]
    raw = [o.value for o in obs]
    known = np.array([r.key is not None for r in rules], dtype=bool)[gid]
    text = np.fromiter((isinstance(v, str) for v in raw), dtype=bool, count=n)
    v = np.fromiter((np.nan if isinstance(x, str) else x for x in raw), dtype=np.float64, count=n)
    values = np.full(n, np.nan)
    numbers = ~text
    for g, r in enumerate(rules):
        if r.conv is not None:
            at = np.flatnonzero((gid == g) & numbers)
            values[at] = r.conv.apply_array(v[at])
    converted = np.array([r.conv is not None for r in rules], dtype=bool)[gid] & numbers
    for j in np.flatnonzero(~known).tolist():
        msg = f"unknown code {obs[j].code!r}: expected a vocabulary key or LOINC code"
        problems.append((j, 0, f"{loc}.observations[{j}].code", msg))
    for j in np.flatnonzero(known & future).tolist():
        problems.append(
            (
                j,
                1,
                f"{loc}.observations[{j}].time",
                f"{obs[j].time.isoformat()} is in the future "
                f"(server time {latest:%Y-%m-%dT%H:%M}Z + tolerance)",
            )
        )
    # text values and units without a conversion: one by one, with the vocabulary's message
    for j in np.flatnonzero(known & ~converted).tolist():
        key = rules[gid[j]].key
        assert key is not None
        try:
            values[j] = vocab.to_canonical(key, raw[j], obs[j].unit)
        except ValueError as exc:
            err = str(exc)
            field_name = "unit" if err.startswith("unit") else "value"
            problems.append((j, 2, f"{loc}.observations[{j}].{field_name}", err))
    if problems:
        problems.sort(key=lambda x: (x[0], x[1]))
        return None, [(where, msg) for _, _, where, msg in problems]
    lo = np.array([r.lo for r in rules], dtype=float)[gid]
    hi = np.array([r.hi for r in rules], dtype=float)[gid]
    with np.errstate(invalid="ignore"):
        ok = (values >= lo) & (values <= hi)  # NaN is outside, as ``not lo <= v <= hi``
    warnings = [
        f"observations[{j}]: {vocab.check_range(str(rules[gid[j]].key), values[j])}: ignored"
        for j in np.flatnonzero(~ok).tolist()
    ]
    keys = np.array([r.key for r in rules], dtype=object)[gid]
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


def feature_inputs_for(prepared: Sequence[PreparedPatient], codes: Sequence[str]) -> FeatureInputs:
    """The training feature code's arrays-level input (``features.build.FeatureInputs``).

    ``prepared`` holds distinct patients; each is queried once, at its ``as_of``, with its
    observations up to then. ``codes`` are the vocabulary keys the features use
    (``features.build.input_codes``). Built straight from the prepared arrays: for a few
    patients, data-contract frames would cost more than the features themselves.
    """
    from features.build import FeatureInputs

    pids = sorted(p.pseudonym for p in prepared)
    rank = {pid: i for i, pid in enumerate(pids)}
    code_index = {c: i for i, c in enumerate(codes)}
    as_of_ns = [_ns_of(p.as_of) for p in prepared]
    keep = [p.time_ns <= a for p, a in zip(prepared, as_of_ns, strict=True)]
    obs_codes = np.concatenate([p.codes[k] for p, k in zip(prepared, keep, strict=True)])
    by_pid = {p.pseudonym: p for p in prepared}
    ordered = [by_pid[pid] for pid in pids]
    columns: dict[str, np.ndarray] = {
        "age": np.array(
            [np.nan if p.covariates.get("age") is None else p.covariates["age"] for p in ordered],
            dtype=np.float64,
        ),
        "sex": np.array([p.covariates.get("sex") for p in ordered], dtype=object),
        "setting": np.array(
            [p.covariates.get("setting") or _guess_setting(p.sources) for p in ordered],
            dtype=object,
        ),
    }
    # 0/1 flags (``cm_*`` comorbidities, ``spo2_scale2``, ...); absent for a patient -> missing
    flags = sorted({k for p in ordered for k in p.covariates if k not in columns})
    for k in flags:
        columns[k] = np.array(
            [np.nan if p.covariates.get(k) is None else p.covariates[k] for p in ordered],
            dtype=np.float64,
        )
    return FeatureInputs(
        patient_ids=np.array(pids, dtype=object),
        obs_patient=np.concatenate(
            [
                np.full(int(k.sum()), rank[p.pseudonym], dtype=np.int32)
                for p, k in zip(prepared, keep, strict=True)
            ]
        ),
        obs_code=np.fromiter(
            (code_index.get(c, -1) for c in obs_codes.tolist()),
            dtype=np.int16,
            count=len(obs_codes),
        ),
        codes=list(codes),
        obs_time_ns=np.concatenate([p.time_ns[k] for p, k in zip(prepared, keep, strict=True)]),
        obs_value=np.concatenate([p.values[k] for p, k in zip(prepared, keep, strict=True)]),
        query_patient=np.array([rank[p.pseudonym] for p in prepared], dtype=np.int64),
        query_time_ns=np.array(as_of_ns, dtype=np.int64),
        patient_columns=columns,
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
