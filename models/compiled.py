"""Compiled tree ensembles for scoring (tl2cgen), behind a parity check, LightGBM as fallback.

Why: a LightGBM booster walks its trees through generic node tables; tl2cgen turns the same
trees into C (nested ``if``s on the features) compiled with the machine's C compiler, which
scores batches of rows faster. A compiled library is only used after it reproduced the
booster's raw margins exactly on rows built from the model's own split thresholds (each
threshold, the doubles either side of it, missing values) and on random rows; on any
difference, a missing compiler or a failed build, scoring stays with LightGBM.

Libraries are cached by the booster's text (``VITALRISK_TREE_CACHE``, default
``~/.cache/vitalrisk/trees``): compiling takes seconds to tens of seconds, once per model and
machine. SHAP contributions (``pred_contrib``) always come from LightGBM.

(lleaves, an LLVM-based compiler, measured faster still but needs llvmlite 0.44, while the
feature kernels' numba needs llvmlite 0.50: one of the two would have to go.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: below this many rows, LightGBM's own call is cheaper than building tl2cgen's matrix
MIN_ROWS = 32


def cache_dir() -> Path:
    env = os.environ.get("VITALRISK_TREE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vitalrisk" / "trees"


#: LightGBM's zero band is +-1e-35 (``kZeroThreshold``); tl2cgen does not reproduce splits
#: at those thresholds for values inside it, so such values are scored by LightGBM
TINY = 1e-30
#: tl2cgen keeps a feature as ``union {int missing; double fvalue}`` and takes a value whose
#: low 32 bits are all ones (e.g. 5.5 - 1 ulp) for missing; LightGBM scores such rows
_LOW32 = np.uint64(0xFFFFFFFF)


def unsafe(X: np.ndarray) -> bool:
    """Does ``X`` hold a value the compiled trees would not score as LightGBM does?"""
    with np.errstate(invalid="ignore"):
        if bool(((np.abs(X) < TINY) & (X != 0)).any()):
            return True
    return bool(((X.view(np.uint64) & _LOW32) == _LOW32).any())


class CompiledTrees:
    """A booster compiled to a shared library; ``raw_score`` equals ``predict(raw_score=True)``."""

    def __init__(self, predictor: Any, n_features: int, path: Path) -> None:
        self._predictor = predictor
        self.n_features = n_features
        self.path = path

    def raw_score(self, X: np.ndarray) -> np.ndarray | None:
        """Raw margins, or None for a matrix with a value the library would score
        differently (:func:`unsafe`: in LightGBM's zero band, or read as missing); no vital
        sign takes such values, and LightGBM scores those matrices."""
        import tl2cgen

        X = np.ascontiguousarray(X, dtype=np.float64)
        if unsafe(X):
            return None
        out = self._predictor.predict(tl2cgen.DMatrix(X, dtype="float64"), pred_margin=True)
        return np.asarray(out, dtype=np.float64).reshape(len(X))


def parity_rows(booster: Any, n_random: int = 256, seed: int = 0) -> np.ndarray:
    """Rows that exercise every split: each threshold, the doubles just below and above it,
    and missing values, spread over rows; plus random rows around the thresholds."""
    n = booster.num_feature()
    thresholds: list[list[float]] = [[] for _ in range(n)]

    def walk(node: dict[str, Any]) -> None:
        if "split_feature" in node:
            t = node.get("threshold")
            if isinstance(t, int | float):
                thresholds[node["split_feature"]].append(float(t))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in booster.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    probes = [
        sorted(
            {
                v
                for t in ts
                for v in (t, np.nextafter(t, -np.inf), np.nextafter(t, np.inf), 0.0)
                if not unsafe(np.array([v]))  # (those go to LightGBM: see raw_score)
            }
        )
        for ts in thresholds
    ]
    width = max([len(p) for p in probes] + [1])
    rng = np.random.default_rng(seed)
    edge = np.full((width + 1, n), np.nan)  # the last row: everything missing
    for j, p in enumerate(probes):
        if p:
            edge[: len(p), j] = rng.permutation(p)  # mix the features' probes across rows
    rand = np.full((n_random, n), np.nan)
    for j, ts in enumerate(thresholds):
        lo, hi = (min(ts), max(ts)) if ts else (-1.0, 1.0)
        span = (hi - lo) or 1.0
        vals = rng.uniform(lo - span, hi + span, n_random)
        vals[rng.random(n_random) < 0.15] = np.nan
        rand[:, j] = vals
    return np.vstack([edge, rand])


def compile_booster(booster: Any, directory: str | Path | None = None) -> CompiledTrees | None:
    """The booster compiled (or loaded from the cache) and checked, or None (LightGBM stays)."""
    try:
        import tl2cgen
        import treelite
    except ImportError:
        log.info("tl2cgen is not installed: scoring with LightGBM")
        return None
    text = booster.model_to_string()
    key = hashlib.sha256(
        f"{text}\n{tl2cgen.__version__}\n{platform.machine()}".encode()
    ).hexdigest()[:32]
    where = Path(directory) if directory else cache_dir()
    lib = where / f"trees-{key}.so"
    try:
        if not lib.is_file():
            where.mkdir(parents=True, exist_ok=True)
            model = treelite.frontend.from_lightgbm(booster)
            with tempfile.TemporaryDirectory(dir=where) as tmp:
                part = Path(tmp) / lib.name
                tl2cgen.export_lib(
                    model,
                    toolchain="gcc",
                    libpath=str(part),
                    params={"parallel_comp": max(1, min(os.cpu_count() or 1, 8))},
                )
                os.replace(part, lib)  # atomic: another process never sees half a library
        compiled = CompiledTrees(tl2cgen.Predictor(str(lib), nthread=1), booster.num_feature(), lib)
    except Exception as exc:  # no compiler, unsupported model, ...: stay with LightGBM
        log.warning("compiling the trees failed (%s): scoring with LightGBM", exc)
        return None
    X = parity_rows(booster)
    want = np.asarray(booster.predict(X, raw_score=True, num_threads=1), dtype=np.float64)
    got = compiled.raw_score(X)
    if got is None or not np.array_equal(got, want):
        worst = float(np.max(np.abs(got - want))) if got is not None else float("nan")
        log.warning("compiled trees differ from LightGBM (max %.3g): scoring with LightGBM", worst)
        return None
    log.info("compiled trees %s: parity on %d rows", lib.name, len(X))
    return compiled
