"""The one canonical observation path: raw (code, value, unit, time) -> canonical value or a reason.

Ingest (every file format), ``/v1/score``, ``/v1/fhir/score`` and ``/v1/observations`` all call
:func:`canonicalise`; each maps the :class:`Reason` of a refused record to its own policy
(quarantine, 422, warning, rejected item). So a unit, range or time rule changes here and in
``config/vocabulary.yaml`` only, and the same record gets the same verdict on every path.

Work is vectorised per distinct (code, unit) pair: a stream of single messages (MQTT) pays a
few microseconds per call, a directory of 20,000 files one numpy pass per pair. Order of the
checks, first failure wins: what the reader found (missing field, unparseable time, FHIR
status) -> unknown code -> time window -> value (category or number) -> unit -> plausible
range of the input unit (threshold conversions) -> conversion -> plausible canonical range.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import pandas as pd

from core.vocabulary import CodeSpec, UnitConversion, Vocabulary, tolerant_limits

NAT_NS = np.iinfo(np.int64).min
DAY_NS = 86_400_000_000_000
MINUTE_NS = 60_000_000_000
_OFFSET = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$", re.IGNORECASE)


class Reason(IntEnum):
    """Why a record is not a canonical observation (0 = it is one)."""

    ACCEPTED = 0
    MISSING_PATIENT = 1
    MISSING_TIME = 2
    UNPARSEABLE_TIME = 3
    NAIVE_TIME = 4
    MISSING_CODE = 5
    UNKNOWN_CODE = 6
    TIME_BEFORE_EARLIEST = 7
    TIME_IN_FUTURE = 8
    TIME_TOO_OLD = 9
    MISSING_VALUE = 10
    UNPARSEABLE_VALUE = 11
    MISSING_UNIT = 12
    UNKNOWN_UNIT = 13
    INPUT_OUT_OF_RANGE = 14
    OUT_OF_RANGE = 15
    STATUS_NOT_DATA = 16
    PRELIMINARY = 17
    SUPERSEDED = 18
    DATA_ABSENT = 19


#: the record field each reason is about (quarantine ``field``, API error location)
REASON_FIELD: dict[Reason, str] = {
    Reason.MISSING_PATIENT: "patient_id",
    Reason.MISSING_TIME: "time",
    Reason.UNPARSEABLE_TIME: "time",
    Reason.NAIVE_TIME: "time",
    Reason.MISSING_CODE: "code",
    Reason.UNKNOWN_CODE: "code",
    Reason.TIME_BEFORE_EARLIEST: "time",
    Reason.TIME_IN_FUTURE: "time",
    Reason.TIME_TOO_OLD: "time",
    Reason.MISSING_VALUE: "value",
    Reason.UNPARSEABLE_VALUE: "value",
    Reason.MISSING_UNIT: "unit",
    Reason.UNKNOWN_UNIT: "unit",
    Reason.INPUT_OUT_OF_RANGE: "value",
    Reason.OUT_OF_RANGE: "value",
    Reason.STATUS_NOT_DATA: "status",
    Reason.PRELIMINARY: "status",
    Reason.SUPERSEDED: "status",
    Reason.DATA_ABSENT: "value",
}
#: reasons about implausible values rather than unusable records (serving: warn, not 422)
IMPLAUSIBLE = frozenset({Reason.INPUT_OUT_OF_RANGE, Reason.OUT_OF_RANGE})
#: reasons that mean "not data by the source's own word" (FHIR/HL7 status, absent data)
NOT_DATA = frozenset(
    {Reason.STATUS_NOT_DATA, Reason.PRELIMINARY, Reason.SUPERSEDED, Reason.DATA_ABSENT}
)


@dataclass(frozen=True)
class TimeWindow:
    """Plausible observation times: not before ``earliest``, not after ``now`` + tolerance,
    and (when ``max_history_days`` is set) not longer than that before the reference time
    (``as_of`` for scoring, the ingest reference otherwise)."""

    earliest_ns: int
    max_future_ns: int
    max_history_ns: int | None = None


@dataclass
class Candidates:
    """Raw records as arrays; text fields as indexes into small tables of distinct strings.

    ``pre`` holds reasons the reader already found (missing field, unparseable time, FHIR
    status, ...); ``detail`` optional per-row text for those reasons' messages.
    """

    code: np.ndarray  # int32 index into code_names ("" = missing)
    code_names: list[str]
    unit: np.ndarray  # int32 index into unit_names ("" = none given)
    unit_names: list[str]
    num: np.ndarray  # float64; NaN where the value is text or missing
    text: np.ndarray | None  # object: non-numeric text values ("" where numeric/missing)
    time_ns: np.ndarray  # int64 UTC ns (NAT_NS when missing/unparseable)
    pre: np.ndarray  # uint8 Reason found by the reader (0 = none)
    column: np.ndarray | None = None  # int32 index into column_names (wide sources)
    column_names: list[str] = field(default_factory=list)
    time_text: np.ndarray | None = None  # object: raw time text, for messages
    detail: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.num)


@dataclass
class Result:
    """Verdict per record: ``key`` (index into ``keys``; -1 unknown), canonical ``value``,
    ``reason`` (0 = accepted). :meth:`message` explains a refused record."""

    keys: list[str]
    key: np.ndarray
    value: np.ndarray
    reason: np.ndarray
    cand: Candidates
    vocab: Vocabulary
    window: TimeWindow | None
    now_ns: int
    ref_ns: np.ndarray | int

    @property
    def accepted(self) -> np.ndarray:
        return self.reason == 0

    def message(self, i: int) -> str:
        return explain(self, i)

    def field_of(self, i: int) -> str:
        return REASON_FIELD.get(Reason(int(self.reason[i])), "record")


# -- rules per (code, unit) -------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    key: int  # index into the vocabulary's keys, -1 unknown
    unit: str  # the unit used (given or default); "" = none
    conv: UnitConversion | None
    missing_unit: bool


def _rule(vocab: Vocabulary, keys: dict[str, int], code: str, unit: str) -> Rule:
    key = vocab.resolve_code(code) if code else None
    if key is None:
        return Rule(-1, unit, None, False)
    spec = vocab.codes[key]
    used = unit or spec.default_unit or ""
    return Rule(keys[key], used, spec.units.get(used) if used else None, used == "")


_TABLES: dict[int, tuple[Vocabulary, list[str], dict[str, int], dict[tuple[str, str], Rule]]] = {}


def _tables(vocab: Vocabulary) -> tuple[list[str], dict[str, int], dict[tuple[str, str], Rule]]:
    """Keys, key index and the rule cache of one vocabulary object (kept with it, by id)."""
    hit = _TABLES.get(id(vocab))
    if hit is None or hit[0] is not vocab:
        keys = list(vocab.codes)
        hit = _TABLES[id(vocab)] = (vocab, keys, {k: i for i, k in enumerate(keys)}, {})
    return hit[1], hit[2], hit[3]


def rule_for(vocab: Vocabulary, code: str, unit: str) -> Rule:
    """The cached rule of one (code, unit) pair (code as sent: key or LOINC)."""
    _, index, cache = _tables(vocab)
    r = cache.get((code, unit))
    if r is None:
        r = cache[(code, unit)] = _rule(vocab, index, code, unit)
    return r


# -- the path -------------------------------------------------------------------------------------


def _unique_inverse(pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(pair) <= 4096:
        uniq, inv = np.unique(pair, return_inverse=True)
        return uniq, inv
    inv, uniq = pd.factorize(pair)
    return np.asarray(uniq), inv


@dataclass
class _RuleTable:
    """Per distinct (code, unit) pair: what the rows of that pair are judged by."""

    key: np.ndarray  # int32, -1 unknown
    unit_bad: np.ndarray  # uint8 Reason: MISSING_UNIT / UNKNOWN_UNIT / 0
    scale: np.ndarray
    offset: np.ndarray
    threshold: np.ndarray  # NaN = none
    in_lo: np.ndarray  # NaN = no input range
    in_hi: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def _rule_table(rules: list[Rule], specs: list[CodeSpec], tol: float) -> _RuleTable:
    m = len(rules)
    t = _RuleTable(*(np.full(m, np.nan) for _ in range(9)))
    t.key = np.array([r.key for r in rules], dtype=np.int32)
    t.unit_bad = np.zeros(m, dtype=np.uint8)
    for i, r in enumerate(rules):
        if r.key < 0:
            continue
        spec = specs[r.key]
        t.lo[i], t.hi[i] = tolerant_limits(*spec.range, tol)
        if r.missing_unit:
            t.unit_bad[i] = Reason.MISSING_UNIT
        elif r.conv is None:
            t.unit_bad[i] = Reason.UNKNOWN_UNIT
        else:
            t.scale[i], t.offset[i] = r.conv.scale, r.conv.offset
            if r.conv.threshold is not None:
                t.threshold[i] = r.conv.threshold
            if r.conv.range is not None:
                t.in_lo[i], t.in_hi[i] = tolerant_limits(*r.conv.range, tol)
    return t


_RULE_TABLES: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Vocabulary, _RuleTable]] = {}


def _rule_table_for(vocab: Vocabulary, names: tuple[tuple[str, str], ...]) -> _RuleTable:
    """The rule table of a set of (code, unit) pairs, cached: requests repeat their pairs."""
    hit = _RULE_TABLES.get((id(vocab), names))
    if hit is not None and hit[0] is vocab:
        return hit[1]
    tab = _rule_table(
        [rule_for(vocab, c, u) for c, u in names], list(vocab.codes.values()), vocab.range_tolerance
    )
    if len(_RULE_TABLES) > 4096:
        _RULE_TABLES.clear()
    _RULE_TABLES[(id(vocab), names)] = (vocab, tab)
    return tab


def canonicalise(
    cand: Candidates,
    vocab: Vocabulary,
    window: TimeWindow | None = None,
    now_ns: int | None = None,
    ref_ns: np.ndarray | int | None = None,
) -> Result:
    """Judge every candidate; pure (inputs unchanged). See the module docstring for the order.

    ``now_ns`` bounds future times; ``ref_ns`` (scalar or per record; default ``now_ns``) is
    the time ``window.max_history_ns`` counts back from. The rules are gathered per distinct
    (code, unit) pair, then every check is one numpy pass over all records, so the cost
    hardly depends on how many codes a request mixes.
    """
    n = len(cand)
    keys, _, _ = _tables(vocab)
    nu = max(len(cand.unit_names), 1)
    uniq, inv = _unique_inverse(cand.code.astype(np.int64) * nu + cand.unit)
    names = tuple((cand.code_names[p // nu], cand.unit_names[p % nu]) for p in uniq.tolist())
    tab = _rule_table_for(vocab, names)
    reason = cand.pre.astype(np.uint8, copy=True)
    key = tab.key[inv]
    live = reason == 0
    unknown = live & (key < 0)
    if unknown.any():
        empty = np.array([c == "" for c, _ in names], dtype=bool)[inv]
        reason[unknown] = np.where(empty[unknown], Reason.MISSING_CODE, Reason.UNKNOWN_CODE)
        live &= ~unknown
    now = int(now_ns) if now_ns is not None else 0
    ref = ref_ns if ref_ns is not None else now
    if window is not None:
        tb = _time_reasons(cand.time_ns, window, now, ref)
        late = live & (tb > 0)
        reason[late] = tb[late]
        live &= ~late
    value = np.full(n, np.nan)
    num = cand.num
    is_num = ~np.isnan(num)
    if cand.text is not None:
        _categories(cand, vocab, keys, key, live & ~is_num, reason, value)
    else:
        reason[live & ~is_num] = Reason.MISSING_VALUE
    m = live & is_num
    if m.any():
        _numbers(num, inv, tab, m, reason, value)
    return Result(keys, key, value, reason, cand, vocab, window, now, ref)


def _time_reasons(t: np.ndarray, w: TimeWindow, now: int, ref: np.ndarray | int) -> np.ndarray:
    out = np.zeros(len(t), dtype=np.uint8)
    ok = t != NAT_NS
    out[ok & (t < w.earliest_ns)] = Reason.TIME_BEFORE_EARLIEST
    out[ok & (t > now + w.max_future_ns) & (out == 0)] = Reason.TIME_IN_FUTURE
    if w.max_history_ns is not None:
        old = ok & (t < np.asarray(ref, dtype=np.int64) - w.max_history_ns) & (out == 0)
        out[old] = Reason.TIME_TOO_OLD
    return out


def _categories(
    cand: Candidates,
    vocab: Vocabulary,
    keys: list[str],
    key: np.ndarray,
    rows: np.ndarray,
    reason: np.ndarray,
    value: np.ndarray,
) -> None:
    """Text values: a category of the code (ACVPU letter, yes/no), else refused."""
    assert cand.text is not None
    for i in np.flatnonzero(rows).tolist():
        t = str(cand.text[i]).strip().lower()
        if not t:
            reason[i] = Reason.MISSING_VALUE
            continue
        v = vocab.codes[keys[key[i]]].categories.get(t)
        if v is None:
            reason[i] = Reason.UNPARSEABLE_VALUE
        else:
            value[i] = float(v)


def _numbers(
    num: np.ndarray,
    inv: np.ndarray,
    tab: _RuleTable,
    m: np.ndarray,
    reason: np.ndarray,
    value: np.ndarray,
) -> None:
    """Numbers of the rows ``m``: finite, unit, input range, conversion, canonical range."""
    at = np.flatnonzero(m)
    x = num[at]
    g = inv[at]
    why = np.zeros(len(at), dtype=np.uint8)
    why[~np.isfinite(x)] = Reason.UNPARSEABLE_VALUE
    ub = tab.unit_bad[g]
    why[(why == 0) & (ub > 0)] = ub[(why == 0) & (ub > 0)]
    with np.errstate(invalid="ignore"):
        out_in = (x < tab.in_lo[g]) | (x > tab.in_hi[g])  # NaN limits: never out
        bad_in = (why == 0) & out_in
        why[bad_in] = Reason.INPUT_OUT_OF_RANGE
        thr = tab.threshold[g]
        conv = np.where(
            np.isnan(thr), x * tab.scale[g] + tab.offset[g], np.where(x > thr, 1.0, 0.0)
        )
        ok = why == 0
        out = ok & ((conv < tab.lo[g]) | (conv > tab.hi[g]))
    why[out] = Reason.OUT_OF_RANGE
    value[at] = np.where(bad_in, x, conv)
    value[at[(why > 0) & ~bad_in & ~out]] = np.nan
    reason[at] = why


# -- building candidates --------------------------------------------------------------------------


def _index(values: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, list[str]]:
    """int32 codes and distinct stripped strings of a text column ("" for missing)."""
    arr = np.asarray(values, dtype=object)
    if len(arr) <= 256:
        table: dict[str, int] = {}
        idx = np.fromiter(
            (table.setdefault(_s(v), len(table)) for v in arr.tolist()), np.int32, len(arr)
        )
        return idx, list(table)
    codes, uniq = pd.factorize(arr, use_na_sentinel=True)
    names = [_s(v) for v in uniq]
    names.append("")
    codes = np.where(codes < 0, len(names) - 1, codes).astype(np.int32)
    # distinct raw strings may strip to the same name: merge them
    merged: dict[str, int] = {}
    remap = np.array([merged.setdefault(nm, len(merged)) for nm in names], dtype=np.int32)
    return remap[codes], list(merged)


def _s(v: object) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v).strip()


def parse_time_text(text: Sequence[Any] | np.ndarray, naive: str) -> tuple[np.ndarray, np.ndarray]:
    """(UTC ns with NAT_NS, reason per row) for ISO-8601 strings; one parse per distinct text.

    Offsets are converted to UTC; naive times are UTC when ``naive == "utc"``, refused when
    ``"reject"``. Naive and offset strings are parsed apart: pandas 2.3 would otherwise give a
    naive string the offset of an earlier string in the same array.
    """
    idx, names = _index(text)
    u = pd.Series(names, dtype=object)
    has_off = u.str.contains(_OFFSET).to_numpy(dtype=bool)
    empty = (u == "").to_numpy()
    ns = np.full(len(names), NAT_NS, dtype=np.int64)
    for m in (has_off & ~empty, ~has_off & ~empty):
        if m.any():
            t = pd.to_datetime(u[m], format="ISO8601", errors="coerce", utc=True)
            ns[m] = np.asarray(t.array.as_unit("ns").asi8)
    why = np.zeros(len(names), dtype=np.uint8)
    why[empty] = Reason.MISSING_TIME
    why[(ns == NAT_NS) & ~empty] = Reason.UNPARSEABLE_TIME
    if naive == "reject":
        why[(why == 0) & ~has_off] = Reason.NAIVE_TIME
    return ns[idx], why[idx]


def from_text(
    code: Sequence[Any] | np.ndarray,
    value: Sequence[Any] | np.ndarray,
    unit: Sequence[Any] | np.ndarray | str,
    time: Sequence[Any] | np.ndarray,
    naive: str = "utc",
    pre: np.ndarray | None = None,
    column: Sequence[Any] | np.ndarray | None = None,
) -> Candidates:
    """Candidates from text columns as found in a file (CSV, FHIR JSON strings, HL7)."""
    n = len(code)
    c_idx, c_names = _index(code)
    if isinstance(unit, str):
        u_idx, u_names = np.zeros(n, dtype=np.int32), [unit.strip()]
    else:
        u_idx, u_names = _index(unit)
    varr = np.asarray(value, dtype=object)
    v_idx, v_names = _index(varr)
    v_num = pd.to_numeric(pd.Series(v_names, dtype=object), errors="coerce").to_numpy(float)
    num = v_num[v_idx]
    vtext = np.array(
        [s if np.isnan(x) else "" for s, x in zip(v_names, v_num, strict=True)], dtype=object
    )
    t_ns, t_why = parse_time_text(time, naive)
    p = np.zeros(n, dtype=np.uint8) if pre is None else pre.astype(np.uint8, copy=True)
    p = np.where(p == 0, t_why, p).astype(np.uint8)
    col_idx, col_names = (None, []) if column is None else _index(column)
    return Candidates(
        code=c_idx,
        code_names=c_names,
        unit=u_idx,
        unit_names=u_names,
        num=num,
        text=vtext[v_idx],
        time_ns=t_ns,
        pre=p,
        column=col_idx,
        column_names=col_names,
        time_text=np.asarray(time, dtype=object),
    )


# -- messages ---------------------------------------------------------------------------------------


def _iso(ns: int) -> str:
    return pd.Timestamp(int(ns), tz="UTC").isoformat().replace("+00:00", "Z")


def _shown(x: float) -> str:
    return f"{x:g}"


def explain(res: Result, i: int) -> str:
    """One sentence: what is wrong with record ``i`` and what was expected."""
    r = Reason(int(res.reason[i]))
    c = res.cand
    if i in c.detail:
        return c.detail[i]
    code = c.code_names[c.code[i]]
    unit = c.unit_names[c.unit[i]]
    key = res.keys[res.key[i]] if res.key[i] >= 0 else code
    spec = res.vocab.codes.get(key)
    raw_text = c.text[i] if c.text is not None else ""
    raw = raw_text or (_shown(c.num[i]) if not np.isnan(c.num[i]) else "")
    ttext = str(c.time_text[i]) if c.time_text is not None else ""
    if r == Reason.MISSING_PATIENT:
        return "missing field: patient_id"
    if r == Reason.MISSING_TIME:
        return "missing field: time"
    if r == Reason.UNPARSEABLE_TIME:
        return f"unparseable time {ttext!r}: expected ISO 8601"
    if r == Reason.NAIVE_TIME:
        return "naive time without UTC offset (ingest.naive_time: reject)"
    if r == Reason.MISSING_CODE:
        return "missing field: code"
    if r == Reason.UNKNOWN_CODE:
        return f"unknown code {code!r}: not a vocabulary key or LOINC code"
    if r in (Reason.TIME_BEFORE_EARLIEST, Reason.TIME_IN_FUTURE, Reason.TIME_TOO_OLD):
        return _time_message(res, i, r)
    if r == Reason.MISSING_VALUE:
        return "missing field: value"
    assert spec is not None
    if r == Reason.UNPARSEABLE_VALUE:
        expected = f"one of {sorted(spec.categories)}" if spec.categories else "a number"
        if raw_text == "" and not np.isnan(c.num[i]):
            expected = "a finite number"
        return f"unparseable value {raw!r} for {key}: expected {expected}"
    if r == Reason.MISSING_UNIT:
        col = ""
        if c.column is not None and c.column_names[c.column[i]]:
            name = c.column_names[c.column[i]]
            col = f" in column {name!r} (give it a unit in ingest.wide_columns/psv_columns)"
        return (
            f"no unit for {key} value {raw}{col}: expected one of {sorted(spec.units)}; "
            f"{key} has no default unit in the vocabulary"
        )
    if r == Reason.UNKNOWN_UNIT:
        return f"unknown unit {unit!r} for {key}: expected one of {sorted(spec.units)}"
    if r == Reason.INPUT_OUT_OF_RANGE:
        used = unit or spec.default_unit or ""
        lo, hi = spec.units[used].range or (np.nan, np.nan)
        return (
            f"out-of-range value: {key} value {raw} {used} outside plausible input range "
            f"[{lo:g}, {hi:g}] {used}"
        )
    if r == Reason.OUT_OF_RANGE:
        used = unit or spec.default_unit or ""
        lo, hi = spec.range
        conv = "" if used == spec.unit else f" = {res.value[i]:g} {spec.unit}"
        shown = f"{raw} {used}".strip() if raw else f"{res.value[i]:g}"
        return (
            f"out-of-range value: {key} value {shown}{conv} outside plausible range "
            f"[{lo:g}, {hi:g}] {spec.unit}"
        )
    return r.name.lower().replace("_", " ")


def _time_message(res: Result, i: int, r: Reason) -> str:
    w = res.window
    assert w is not None
    t = _iso(int(res.cand.time_ns[i]))
    if r == Reason.TIME_BEFORE_EARLIEST:
        return f"implausible time {t}: before the earliest plausible time {_iso(w.earliest_ns)}"
    if r == Reason.TIME_IN_FUTURE:
        tol = w.max_future_ns / MINUTE_NS
        return f"{t} is in the future (after {_iso(res.now_ns)} + {tol:g} min)"
    ref = np.asarray(res.ref_ns)
    ref_i = int(ref[i]) if ref.ndim else int(ref)
    days = (w.max_history_ns or 0) / DAY_NS
    return f"implausible time {t}: more than {days:g} days before the reference time {_iso(ref_i)}"
