"""Interpret raw candidates once, vectorised: times, codes, units, categories, plausible ranges.

Why one place: every reader (CSV, FHIR, PSV, ...) yields strings as found; judging them here
means a unit or range rule changes once in ``config/vocabulary.yaml`` and applies to all
formats, and the quarantine reasons read the same whatever the source.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary
from ingest.config import IngestConfig

logger = logging.getLogger(__name__)

_OFFSET = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$", re.IGNORECASE)
TRUE_TEXT = {"true", "1", "yes", "y", "t"}
FALSE_TEXT = {"false", "0", "no", "n", "f"}


def _clean(v: object) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip()


def _text(s: pd.Series) -> pd.Series:
    """Stripped text, missing -> "". Works on the distinct values only (columns repeat a lot)."""
    codes, uniq = pd.factorize(s, use_na_sentinel=True)
    clean = np.array([*(_clean(v) for v in uniq), ""], dtype=object)  # code -1 -> ""
    return pd.Series(clean[codes], index=s.index, dtype=object)


def parse_times(text: pd.Series, naive: str) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(UTC times, unparseable mask, rejected-naive mask) for ISO-8601 strings.

    Times with an offset are converted to UTC; naive times are taken as UTC when
    ``naive == "utc"`` and rejected when ``naive == "reject"``.
    """
    t = _text(text)
    codes, uniq = pd.factorize(t)
    u = pd.Series(uniq, dtype=object)
    u_offset = u.str.contains(_OFFSET).to_numpy(dtype=bool)
    # parse naive and offset strings separately: pandas 2.3 gives a naive string that follows
    # an offset string in the same array that earlier string's offset
    u_times = pd.Series(pd.NaT, index=u.index, dtype="datetime64[ns, UTC]")
    for m in (u_offset, ~u_offset & (u != "").to_numpy()):
        if m.any():
            u_times[m] = pd.to_datetime(u[m], format="ISO8601", errors="coerce", utc=True)
    times = pd.Series(u_times.array.take(codes), index=t.index)
    unparseable = times.isna() & (t != "")
    has_offset = pd.Series(u_offset[codes], index=t.index)
    naive_bad = (
        (~has_offset) & ~unparseable & (t != "")
        if naive == "reject"
        else pd.Series(False, index=t.index)
    )
    return times, unparseable, naive_bad


def parse_bool(text: pd.Series) -> pd.Series:
    """True / False / NA from common spellings; anything else is NA."""
    t = _text(text).str.lower()
    out = pd.Series(pd.NA, index=t.index, dtype="boolean")
    out[t.isin(TRUE_TEXT)] = True
    out[t.isin(FALSE_TEXT)] = False
    return out


def normalise_observations(
    raw: pd.DataFrame, vocab: Vocabulary, cfg: IngestConfig, default_source: str = "unknown"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split raw candidates into canonical observations and rejected records.

    Returns ``accepted`` (source_id, time, code, value, source, line) and ``rejected``
    (line, field, reason, code, source_id). Each input row lands in exactly one of them.
    """
    n = len(raw)
    idx = raw.index
    reason = pd.Series("", index=idx, dtype=object)
    field = pd.Series("", index=idx, dtype=object)

    def reject(mask: pd.Series, fld: str, why: Callable[[pd.Index], pd.Series] | str) -> None:
        new = mask & (reason == "")
        if not new.any():
            return
        at = new.index[new.to_numpy()]
        reason.loc[at] = why if isinstance(why, str) else why(at).to_numpy()
        field.loc[at] = fld

    def mask_of(at: pd.Index) -> pd.Series:
        m = pd.Series(False, index=idx)
        m.loc[at] = True
        return m

    sid = _text(raw["source_id"])
    code_raw = _text(raw["code"])
    vtext = _text(raw["value"])
    unit = _text(raw["unit"])
    reject(sid == "", "patient_id", "missing field: patient_id")
    tt = _text(raw["time"])
    reject(tt == "", "time", "missing field: time")
    reject(code_raw == "", "code", "missing field: code")
    times, unparseable, naive_bad = parse_times(tt, cfg.naive_time)
    reject(
        unparseable,
        "time",
        lambda at: "unparseable time " + tt[at].map(repr) + ": expected ISO 8601",
    )
    reject(naive_bad, "time", "naive time without UTC offset (ingest.naive_time: reject)")
    keys = code_raw.map({c: vocab.resolve_code(c) for c in code_raw.unique()})
    reject(
        keys.isna() & (code_raw != ""),
        "code",
        lambda at: (
            "unknown code " + code_raw[at].map(repr) + ": not a vocabulary key or LOINC code"
        ),
    )
    reject(vtext == "", "value", "missing field: value")
    num = pd.to_numeric(vtext, errors="coerce")
    value = pd.Series(np.nan, index=idx, dtype=float)
    live = reason == ""
    for key, kidx in keys[live].groupby(keys[live]).groups.items():
        spec = vocab.codes[str(key)]
        knum = num.loc[kidx]
        is_text = knum.isna()
        if is_text.any():
            tidx = knum.index[is_text]
            lower = vtext.loc[tidx].str.lower()
            cat = lower.map(spec.categories) if spec.categories else pd.Series(np.nan, index=tidx)
            value.loc[tidx] = cat.astype(float)
            expected = f"one of {sorted(spec.categories)}" if spec.categories else "a number"
            bad = cat.isna().to_numpy()
            tail = f" for {key}: expected {expected}"

            def why_text(at: pd.Index, tail: str = tail) -> pd.Series:
                return "unparseable value " + vtext[at].map(repr) + tail

            reject(mask_of(tidx[bad]), "value", why_text)
        nidx = knum.index[~is_text]
        if len(nidx):
            units = unit.loc[nidx].where(unit.loc[nidx] != "", spec.unit)
            for u, uidx in units.groupby(units).groups.items():
                conv = spec.units.get(str(u))
                if conv is None:
                    reject(
                        mask_of(pd.Index(uidx)),
                        "unit",
                        f"unknown unit {u!r} for {key}: expected one of {sorted(spec.units)}",
                    )
                    continue
                value.loc[uidx] = conv.apply_array(knum.loc[uidx].to_numpy(dtype=float))
        lo, hi = spec.range
        kv = value.loc[kidx]
        out = (kv < lo) | (kv > hi) | ~np.isfinite(kv)
        out &= kv.notna()
        if out.any():
            head = f" for {key}: "
            tail = f" {spec.unit} outside plausible range [{lo:g}, {hi:g}]"

            def why_range(at: pd.Index, head: str = head, tail: str = tail) -> pd.Series:
                shown = value[at].map(lambda x: f"{x:g}")
                return "out-of-range value " + vtext[at].map(repr) + head + shown + tail

            reject(mask_of(out.index[out.to_numpy()]), "value", why_range)
    ok = reason == ""
    src = _text(raw["source"]).where(lambda s: s != "", default_source)
    accepted = pd.DataFrame(
        {
            "source_id": sid[ok].to_numpy(),
            "time": times[ok].to_numpy(),
            "code": keys[ok].astype(str).to_numpy(),
            "value": value[ok].to_numpy(dtype=float),
            "source": src[ok].to_numpy(),
            "line": raw["line"][ok].to_numpy(dtype=np.int64),
        }
    )
    accepted["time"] = pd.to_datetime(accepted["time"], utc=True)
    rej = ~ok
    rejected = pd.DataFrame(
        {
            "line": raw["line"][rej].to_numpy(dtype=np.int64),
            "field": field[rej].to_numpy(),
            "reason": reason[rej].to_numpy(),
            "code": keys[rej].fillna(code_raw[rej]).to_numpy(),
            "source_id": sid[rej].to_numpy(),
        }
    )
    logger.debug(
        "normalised %d candidates: %d accepted, %d rejected", n, int(ok.sum()), int(rej.sum())
    )
    return accepted, rejected


def scrubber(pattern: str, pseudo: Callable[[str], str]) -> Callable[[str, str], str]:
    """A function that pseudonymises identifiers in free text (quarantined records).

    Replaces the record's own source id (when known) and anything matching ``pattern``.
    """
    rx = re.compile(pattern) if pattern else None

    def scrub(text: str, source_id: str = "") -> str:
        out = str(text)
        if source_id and source_id in out:
            out = out.replace(source_id, pseudo(source_id))
        if rx is not None:
            out = rx.sub(lambda m: pseudo(m.group(0)), out)
        return out

    return scrub
