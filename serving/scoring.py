"""Scoring logic behind the HTTP API, independent of BentoML so it is testable in-process.

Raw observations are validated and converted with the vocabulary, turned into features by the
*training* feature code (``features.build.compute_features``), scored by the registered
``RiskModel`` and explained with LightGBM's own SHAP contributions in clinician words.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary
from governance.pseudonym import get_key, pseudonymise
from ingest.canonical import (
    DAY_NS,
    IMPLAUSIBLE,
    MINUTE_NS,
    Candidates,
    Reason,
    TimeWindow,
    canonicalise,
)
from ingest.config import TimeWindowConfig
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
        self._get = itemgetter(*self.feature_names) if len(self.feature_names) > 1 else None
        self.compiling: threading.Thread | None = None
        # the model's choice (train.compiled_trees, in its metadata), unless the environment
        # says otherwise: VITALRISK_COMPILED_TREES=tl2cgen | none
        wanted = os.environ.get("VITALRISK_COMPILED_TREES", "").lower() or (
            getattr(self.model, "metadata", None) or {}
        ).get("compiled_trees", "none")
        if wanted == "tl2cgen" and hasattr(self.model, "compile_trees"):
            # compiled trees (models/compiled.py) are built or loaded on a thread; until they
            # are ready, and if they fail their parity check, LightGBM scores
            self.compiling = threading.Thread(
                target=self.model.compile_trees, name=f"compile-{self.version}", daemon=True
            )
            self.compiling.start()

    def matrix(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Rows of ``{feature: value}`` -> float matrix in training order (missing -> NaN).

        Encodes categorical strings exactly like ``RiskModel.prepare`` (unknown -> NaN).
        """
        return self.encode(self.table(rows)[0])

    def table(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[int]]:
        """Each row's values in training order (absent -> None), and the positions of the
        rows whose keys are not exactly the features (absent ones, or others besides)."""
        names, get = self.feature_names, self._get
        n = len(names)
        if get is None:
            return [[row.get(x) for x in names] for row in rows], list(range(len(rows)))
        table: list[Any] = []
        inexact: list[int] = []
        for i, row in enumerate(rows):
            try:  # every feature present (the usual request): one C-level lookup
                table.append(get(row))
            except KeyError:
                table.append([row.get(x) for x in names])
                inexact.append(i)
                continue
            if len(row) != n:  # all features found: exact unless there are more keys
                inexact.append(i)
        return table, inexact

    def encode(self, table: Sequence[Sequence[Any]]) -> np.ndarray:
        """Float matrix of :meth:`table`'s rows (None -> NaN, categories by their codes)."""
        names, cats = self.feature_names, self._cats
        try:
            return np.array(table, dtype=float).reshape(len(table), len(names))  # None -> NaN
        except (TypeError, ValueError):
            pass  # text (categorical) values: encode cell by cell
        X = np.full((len(table), len(names)), np.nan, dtype=float)
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
        """Calibrated probabilities for a prepared matrix (single-threaded; compiled trees
        once they are ready, see ``models.compiled``)."""
        if hasattr(self.model, "predict_proba_matrix"):
            return np.asarray(self.model.predict_proba_matrix(X, threads=1))
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
    #: the identifier the caller sent (echoed in the answer, never stored)
    caller_id: str = ""


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


#: observations more than this before the prediction time are refused (a stale reading of
#: another stay, or a wrong year); the lookback of the features is far shorter
SCORING_HISTORY_DAYS = 365.0


@lru_cache(maxsize=8)
def scoring_window(future_tolerance_minutes: float) -> TimeWindow:
    """The canonical path's time window for the API: ingest's earliest plausible time, the
    server clock + tolerance for the future, ``SCORING_HISTORY_DAYS`` before ``as_of``."""
    base = TimeWindowConfig().window()
    return TimeWindow(
        earliest_ns=base.earliest_ns,
        max_future_ns=int(future_tolerance_minutes * MINUTE_NS),
        max_history_ns=int(SCORING_HISTORY_DAYS * DAY_NS),
    )


def observation_candidates(obs: Sequence[Any], t_ns: np.ndarray) -> Candidates:
    """Candidates of API observations (``code``, ``value`` number or text, ``unit``).

    One dict lookup per observation (its (code, unit) pair); stripping and the code/unit
    tables work on the distinct pairs only. A text value that reads as a finite number is
    that number, as in a CSV file.
    """
    n = len(obs)
    pairs: dict[tuple[str, str | None], int] = {}
    gid = np.fromiter(
        (pairs.setdefault((o.code, o.unit), len(pairs)) for o in obs), dtype=np.int32, count=n
    )
    codes: dict[str, int] = {}
    units: dict[str, int] = {}
    pc = np.array([codes.setdefault(c.strip(), len(codes)) for c, _ in pairs], dtype=np.int32)
    pu = np.array(
        [units.setdefault((u or "").strip(), len(units)) for _, u in pairs], dtype=np.int32
    )
    raw = [o.value for o in obs]
    text = None
    if not any(type(v) is str for v in raw):  # numbers only: one C-level conversion
        num = np.array(raw, dtype=np.float64).reshape(n)
    else:
        num = np.full(n, np.nan)
        text = np.full(n, "", dtype=object)
        for j, v in enumerate(raw):
            if not isinstance(v, str):
                num[j] = v
                continue
            try:
                x = float(v)
            except ValueError:
                text[j] = v.strip() or " "
                continue
            if math.isfinite(x):
                num[j] = x
            else:
                text[j] = v
    return Candidates(
        code=pc[gid],
        code_names=list(codes),
        unit=pu[gid],
        unit_names=list(units),
        num=num,
        text=text,
        time_ns=t_ns,
        pre=np.zeros(n, dtype=np.uint8),
    )


def _prepare_one(
    loc: str, p: PatientIn, vocab: Vocabulary, now: datetime, latest: datetime
) -> tuple[PreparedPatient | None, list[tuple[str, str]]]:
    """Canonical arrays and warnings for one patient, or the problems that make it a 422.

    The canonical observation path (``ingest.canonical``) judges every observation; its
    reasons map to this route's policy: implausible values are ignored with a warning,
    everything else (unknown code, unit or category, implausible time) is a 422 naming the
    observation.
    """
    obs = p.observations
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
    window = scoring_window((latest - now) / timedelta(minutes=1))
    now_ns, latest_ns = _ns_of(now), _ns_of(latest)
    as_of: datetime | None = None
    if p.as_of is not None:
        as_of = p.as_of.astimezone(UTC)
        if as_of > latest:
            return None, [(f"{loc}.as_of", "prediction time is in the future")]
        if not _NS_MIN <= _ns_of(as_of) <= _NS_MAX or _ns_of(as_of) < window.earliest_ns:
            first = pd.Timestamp(window.earliest_ns, tz="UTC").isoformat()
            return None, [
                (
                    f"{loc}.as_of",
                    f"{as_of.isoformat()}: implausible prediction time (before {first})",
                )
            ]
        ref = _ns_of(as_of)
    else:
        fine = t_ns[t_ns <= latest_ns]
        ref = int(fine.max()) if len(fine) else now_ns
    res = canonicalise(observation_candidates(obs, t_ns), vocab, window, now_ns, ref)
    problems: list[tuple[str, str]] = []
    warnings: list[str] = []
    for j in np.flatnonzero(res.reason).tolist():
        why = Reason(int(res.reason[j]))
        if why in IMPLAUSIBLE:
            warnings.append(f"observations[{j}]: {res.message(j)}: ignored")
        else:
            problems.append((f"{loc}.observations[{j}].{res.field_of(j)}", res.message(j)))
    if problems:
        return None, problems
    sel = np.flatnonzero(res.reason == 0)
    if as_of is None:
        as_of = obs[int(sel[np.argmax(t_ns[sel])])].time.astimezone(UTC) if len(sel) else now
    later = int((t_ns[sel] > _ns_of(as_of)).sum())
    if later:
        warnings.append(f"{later} observation(s) after as_of ignored")
    keys = np.array(res.keys, dtype=object)
    prepared = PreparedPatient(
        pseudonym="",
        as_of=as_of,
        time_ns=t_ns[sel],
        codes=keys[res.key[sel]],
        values=res.value[sel],
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
            prepared.caller_id = p.patient_id
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
