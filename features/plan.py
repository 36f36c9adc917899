"""One plan from the feature families; the bank that both executors fill.

A feature family (``features/families/``) declares three things: its feature specs (the
dictionary entries, in output order), what it needs from the observations (through
:class:`Requests`: time bounds, intervals with their statistics, running min/max over nested
windows, the latest value of a code) and one vectorised ``combine`` step that turns a
:class:`Bank` into its feature rows. :func:`build_plan` collects those requests from every
registered family into one :class:`Plan`, deduplicated (a baseline interval that three
families use is computed once).

An executor (``features/executors.py``) computes the bank for a batch of queries: the
stacked executor for a few queries (all codes in one pass), the per-code executor in patient
chunks for large inputs. Both give the same bits (the same IEEE operations in the same
order), and every feature is formulated once, in its family's ``combine``.

Bank layout, each array with one column per query:

- ``idx`` (slot, query): position of the first observation later than the slot's bound
  ``t - hours`` in the code's sorted series (``hours == 0``: one past the last at or before t);
- ``stats[name]`` (interval, query) for ``mean``, ``sum``, ``count``, ``std``, ``slope`` over
  the rows between two slots; only the statistics an interval was requested with are valid;
- ``run_min`` / ``run_max`` (run, window, query): min/max over each of a run's nested windows;
- ``last`` / ``since`` (code, query): the latest value at or before t within the lookback,
  and hours since it (NaN when there is none);
- ``patient[family]``: the family's per-patient arrays (``Family.per_patient``), indexed by
  ``patient_index`` (the query's patient in the call).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from core.vocabulary import CodeSpec, Vocabulary
    from features.config import FeaturesConfig

HOUR_NS = 3_600_000_000_000
#: the moment statistics of an interval (from centred prefix sums)
MOMENT_STATS = ("mean", "sum", "count", "std", "slope")
#: which centred prefix sums (``features.kernels.prefix_moments`` rows) each statistic needs
STAT_MOMENTS: dict[str, frozenset[str]] = {
    "mean": frozenset({"v"}),
    "sum": frozenset({"v"}),
    "count": frozenset(),
    "std": frozenset({"v", "vv"}),
    "slope": frozenset({"v", "t", "tv", "tt"}),
}


@dataclass(frozen=True)
class FeatureSpec:
    """One entry of the feature dictionary."""

    name: str
    definition: str
    unit: str
    window: str
    code: str


@dataclass(frozen=True)
class Context:
    """What a family sees: the config, the vocabulary and the codes of this call."""

    config: FeaturesConfig
    vocab: Vocabulary
    #: codes that get features (``features.codes``), in config order
    fcodes: tuple[str, ...]
    #: every code whose observations are used (fcodes + the families' extra codes), sorted
    all_codes: tuple[str, ...]
    #: patient-table fields available (static columns are expanded on these)
    patient_fields: tuple[str, ...]

    def spec(self, code: str) -> CodeSpec:
        return self.vocab.codes[code]


class Family:
    """Base of a feature family. Subclasses set ``name`` (its switch in
    ``features.families``) and, when it has params, ``section`` and ``params_type`` (a
    pydantic model validated from ``params.yaml: features.<section>``)."""

    name: ClassVar[str]
    section: ClassVar[str | None] = None
    params_type: ClassVar[Any] = None
    #: the section's value when params.yaml does not have it
    params_default: ClassVar[Any] = {}

    def active(self, ctx: Context) -> bool:
        return ctx.config.enabled(self.name)

    def lookback_needed(self, config: FeaturesConfig) -> float:
        """Hours of history before t this family reads (``lookback_hours`` must cover it)."""
        return 0.0

    def input_codes(self, config: FeaturesConfig, vocab: Vocabulary) -> set[str]:
        """Codes the family reads beyond ``features.codes`` (e.g. the NEWS2 parameters)."""
        return set()

    def code_specs(self, ctx: Context, code: str) -> list[FeatureSpec]:
        """Features per code of ``ctx.fcodes`` (output order: code by code, family by family)."""
        return []

    def specs(self, ctx: Context) -> list[FeatureSpec]:
        """Features not tied to one code (after every code's features, in family order)."""
        return []

    def patient_fields(self, ctx: Context) -> list[str]:
        """Patient-table fields the family reads (see :meth:`per_patient`)."""
        return []

    def per_patient(self, ctx: Context, columns: Mapping[str, np.ndarray], n: int) -> Any:
        """Per-patient values computed once per call (available as ``bank.patient[name]``)."""
        return None

    def request(self, ctx: Context, req: Requests) -> Part:
        """Declare what :meth:`combine` reads; return its part of the plan."""
        raise NotImplementedError

    def combine(self, part: Part, bank: Bank) -> np.ndarray:
        """Feature rows ``(len(part.names), queries)`` in ``part.names`` order."""
        raise NotImplementedError


@dataclass(frozen=True)
class Part:
    """A family's part of the plan: its output names and the bank positions it reads."""

    names: tuple[str, ...]
    index: Mapping[str, np.ndarray] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.index[key]


class Requests:
    """The builder families declare their needs to (deduplicated across families)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._code = {c: i for i, c in enumerate(ctx.all_codes)}
        self.slots: dict[tuple[int, float], int] = {}
        self.intervals: dict[tuple[int, int, int], int] = {}
        self.interval_stats: list[set[str]] = []
        self.runs: list[tuple[int, tuple[int, ...]]] = []
        self.run_kinds: list[set[str]] = []
        self._run_of: dict[tuple[int, tuple[float, ...]], int] = {}
        for ci in range(len(ctx.all_codes)):  # the upper bound and the lookback of every code
            self.slot(ctx.all_codes[ci], 0.0)
            self.slot(ctx.all_codes[ci], ctx.config.lookback_hours)

    def code(self, code: str) -> int:
        """Index of ``code`` in ``ctx.all_codes`` (its row of ``bank.last``/``bank.since``)."""
        return self._code[code]

    def slot(self, code: str, hours: float) -> int:
        """The bound ``t - hours`` of ``code``'s series (``hours == 0``: t itself)."""
        return self.slots.setdefault((self._code[code], float(hours)), len(self.slots))

    def interval(
        self, code: str, hours: float, until_hours: float = 0.0, stats: Sequence[str] = ()
    ) -> int:
        """Observations of ``code`` in ``(t - hours, t - until_hours]``, with ``stats``."""
        unknown = set(stats) - set(MOMENT_STATS)
        if unknown:
            raise ValueError(f"interval statistics {sorted(unknown)} not in {MOMENT_STATS}")
        ci = self._code[code]
        key = (ci, self.slot(code, hours), self.slot(code, until_hours))
        k = self.intervals.setdefault(key, len(self.intervals))
        if k == len(self.interval_stats):
            self.interval_stats.append(set())
        self.interval_stats[k] |= set(stats)
        return k

    def running(
        self, code: str, hours: Sequence[float], kinds: Sequence[str] = ("min", "max")
    ) -> int:
        """Running ``kinds`` (min, max) over the nested windows ``(t - h, t]`` of ascending
        ``hours``: ``bank.run_min[run, i]`` is the minimum over the i-th window."""
        hs = tuple(float(h) for h in hours)
        if list(hs) != sorted(hs) or not hs:
            raise ValueError("running windows must be a non-empty ascending list of hours")
        if not set(kinds) <= {"min", "max"}:
            raise ValueError(f"running kinds must be min and/or max, got {list(kinds)}")
        ci = self._code[code]
        key = (ci, hs)
        if key not in self._run_of:
            self._run_of[key] = len(self.runs)
            self.runs.append((ci, tuple(self.slot(code, h) for h in hs)))
            self.run_kinds.append(set())
        run = self._run_of[key]
        self.run_kinds[run] |= set(kinds)
        return run


@dataclass(frozen=True)
class Plan:
    """Everything an executor computes and every family's combine step, for one config."""

    n_codes: int
    slot_code: np.ndarray
    slot_hours: np.ndarray
    hi_slot: np.ndarray  # per code: the slot of t itself
    lb_slot: np.ndarray  # per code: the lookback slot
    iv_code: np.ndarray
    iv_lo: np.ndarray
    iv_hi: np.ndarray
    iv_stats: tuple[frozenset[str], ...]
    iv_need: np.ndarray  # (interval, 5) bool: which of MOMENT_STATS it was requested with
    run_code: np.ndarray
    run_lo: np.ndarray  # (run, window): slot of each window's lower bound (padding: hi)
    run_end: np.ndarray  # same shape: end slot of each window's new piece (padding: hi)
    run_windows: np.ndarray  # windows per run
    run_kinds: tuple[frozenset[str], ...]  # min and/or max per run
    run_need: np.ndarray  # (run, 2) bool: min, max
    #: per code: its slots, intervals, runs and the prefix sums its statistics need
    code_slots: tuple[np.ndarray, ...]
    code_ivs: tuple[np.ndarray, ...]
    code_runs: tuple[np.ndarray, ...]
    code_moments: tuple[frozenset[str], ...]
    parts: tuple[tuple[Family, Part, np.ndarray], ...]  # family, part, output columns
    #: output columns no family writes (e.g. shock_index without heart rate or SBP): NaN
    unwritten: np.ndarray
    _units: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def slot_units(self, unit: int) -> np.ndarray:
        """Each slot's ``hours`` in integer time units (0 stays 0), as ``TimeKeys.units``."""
        hit = self._units.get(unit)
        if hit is None:
            hit = np.array(
                [round(h * HOUR_NS / unit) for h in self.slot_hours.tolist()], dtype=np.int64
            )
            self._units[unit] = hit
        return hit


def build_plan(
    ctx: Context, families: Sequence[Family], col_of: Mapping[str, int], n_columns: int
) -> Plan:
    """Collect every active family's requests; map its outputs to columns of ``col_of``."""
    req = Requests(ctx)
    parts: list[tuple[Family, Part, np.ndarray]] = []
    for fam in families:
        if not fam.active(ctx):
            continue
        part = fam.request(ctx, req)
        keep = [i for i, n in enumerate(part.names) if n in col_of]
        if len(keep) != len(part.names):
            missing = [n for n in part.names if n not in col_of]
            raise ValueError(f"family {fam.name!r} combines features it has no spec for: {missing}")
        parts.append((fam, part, np.array([col_of[n] for n in part.names], dtype=np.intp)))

    def arr(x: Sequence[int]) -> np.ndarray:
        return np.array(x, dtype=np.intp)

    n_codes = len(ctx.all_codes)
    slot_keys = list(req.slots)
    iv_keys = list(req.intervals)
    hi_slot = [req.slots[(ci, 0.0)] for ci in range(n_codes)]
    lb_slot = [req.slots[(ci, float(ctx.config.lookback_hours))] for ci in range(n_codes)]
    w_max = max([len(s) for _, s in req.runs], default=0)
    run_lo = np.zeros((len(req.runs), w_max), dtype=np.intp)
    run_end = np.zeros((len(req.runs), w_max), dtype=np.intp)
    for r, (ci, los) in enumerate(req.runs):
        hs = hi_slot[ci]
        run_lo[r] = hs  # padding: the empty piece [hi, hi)
        run_end[r] = hs
        run_lo[r, : len(los)] = los
        run_end[r, : len(los)] = [hs, *los[:-1]]
    code_moments = []
    for ci in range(n_codes):
        need: set[str] = set()
        for k, (c, _, _) in enumerate(iv_keys):
            if c == ci:
                for s in req.interval_stats[k]:
                    need |= STAT_MOMENTS[s]
        code_moments.append(frozenset(need))
    return Plan(
        n_codes=n_codes,
        slot_code=arr([c for c, _ in slot_keys]),
        slot_hours=np.array([h for _, h in slot_keys], dtype=np.float64),
        hi_slot=arr(hi_slot),
        lb_slot=arr(lb_slot),
        iv_code=arr([c for c, _, _ in iv_keys]),
        iv_lo=arr([lo for _, lo, _ in iv_keys]),
        iv_hi=arr([hi for _, _, hi in iv_keys]),
        iv_stats=tuple(frozenset(s) for s in req.interval_stats),
        iv_need=np.array(
            [[st in s for st in MOMENT_STATS] for s in req.interval_stats], dtype=np.bool_
        ).reshape(-1, len(MOMENT_STATS)),
        run_code=arr([c for c, _ in req.runs]),
        run_lo=run_lo,
        run_end=run_end,
        run_windows=arr([len(s) for _, s in req.runs]),
        run_kinds=tuple(frozenset(k) for k in req.run_kinds),
        run_need=np.array(
            [["min" in k, "max" in k] for k in req.run_kinds], dtype=np.bool_
        ).reshape(-1, 2),
        code_slots=tuple(
            arr([s for s, (c, _) in enumerate(slot_keys) if c == ci]) for ci in range(n_codes)
        ),
        code_ivs=tuple(
            arr([k for k, (c, _, _) in enumerate(iv_keys) if c == ci]) for ci in range(n_codes)
        ),
        code_runs=tuple(
            arr([r for r, (c, _) in enumerate(req.runs) if c == ci]) for ci in range(n_codes)
        ),
        code_moments=tuple(code_moments),
        parts=tuple(parts),
        unwritten=np.setdiff1d(
            np.arange(n_columns), np.concatenate([np.zeros(0, np.intp), *(c for *_, c in parts)])
        ),
    )


@dataclass
class Bank:
    """What the executors compute for one batch of queries (layout: module docstring)."""

    idx: np.ndarray
    stats: dict[str, np.ndarray]
    run_min: np.ndarray
    run_max: np.ndarray
    last: np.ndarray
    since: np.ndarray
    patient_index: np.ndarray
    patient: Mapping[str, Any]

    @property
    def m(self) -> int:
        return self.last.shape[1]

    def count(self, ivs: np.ndarray) -> np.ndarray:
        return self.stats["count"][ivs]
