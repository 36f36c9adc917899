"""The deployable model: LightGBM booster + probability calibrator as one MLflow pyfunc.

Why a custom pyfunc: MLflow's LightGBM flavour of an ``LGBMClassifier`` predicts labels and
knows nothing about calibration. Serving and monitoring need *calibrated probabilities* and
per-feature contributions from the same object, so ``RiskModel.predict`` returns
probabilities, and ``predict_proba`` / ``contributions`` are available after
``mlflow.pyfunc.load_model(uri).unwrap_python_model()``.

The booster is stored as LightGBM's own model text (artifact ``booster``), not pickled, so the
artifact stays readable and survives Python upgrades; the calibrator (scikit-learn) and the
feature list are pickled with the python model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

log = logging.getLogger(__name__)

BOOSTER_ARTIFACT = "booster"
#: batches smaller than this are scored on one thread
SMALL_BATCH = 5000
#: rows per block when a large frame is turned into a matrix and scored
BLOCK_ROWS = 65536


def matrix_dtype(frame: pd.DataFrame, names: Sequence[str]) -> type[np.floating]:
    """float32 when every feature column is float32 (the features stage's output: exact,
    half the memory), else float64 (values that float32 would round stay exact)."""
    return np.float32 if all(frame[n].dtype == np.float32 for n in names) else np.float64


def feature_matrix(
    frame: pd.DataFrame,
    names: Sequence[str],
    categories: Mapping[str, Sequence[str]] | None = None,
    rows: np.ndarray | slice | None = None,
    dtype: type[np.floating] | None = None,
) -> np.ndarray:
    """The model's input as one C-contiguous float matrix (rows x ``names``), built column by
    column in blocks of rows, so the only copy is the matrix itself (no float64 frame).

    Encodes categorical strings like :meth:`RiskModel.prepare` (unknown -> NaN) and reads
    other non-float columns with ``pd.to_numeric`` (not a number -> NaN).
    """
    dtype = dtype or matrix_dtype(frame, names)
    cats = categories or {}
    columns = []
    for name in names:
        col = frame[name]
        if name in cats and not pd.api.types.is_numeric_dtype(col):
            lookup = {c: float(i) for i, c in enumerate(cats[name])}
            columns.append(col.astype("object").map(lookup).to_numpy(dtype=np.float64))
        elif col.dtype.kind in "fiub":
            columns.append(col.to_numpy())
        else:
            columns.append(pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64))
    index = np.arange(len(frame))[rows] if rows is not None else None
    n = len(frame) if index is None else len(index)
    out = np.empty((n, len(names)), dtype=dtype)
    for r0 in range(0, n, 4096):  # a block of rows stays in cache while its columns land
        r1 = min(n, r0 + 4096)
        sel = slice(r0, r1) if index is None else index[r0:r1]
        for j, values in enumerate(columns):
            out[r0:r1, j] = values[sel]
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


@dataclass
class Calibrator:
    """Maps the booster's raw margin to a calibrated probability (fitted on held-out data).

    ``method='isotonic'`` uses ``sklearn.isotonic.IsotonicRegression`` on the raw margin;
    ``method='sigmoid'`` is Platt scaling: ``LogisticRegression`` on the raw margin;
    ``method='none'`` applies the plain logistic link (uncalibrated).
    """

    method: str = "isotonic"
    model: Any = None

    def fit(self, raw: np.ndarray, y: np.ndarray) -> Calibrator:
        raw = np.asarray(raw, dtype=float).reshape(-1)
        y = np.asarray(y, dtype=int).reshape(-1)
        if self.method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            self.model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw, y)
        elif self.method == "sigmoid":
            from sklearn.linear_model import LogisticRegression

            self.model = LogisticRegression(C=1e6, max_iter=1000).fit(raw.reshape(-1, 1), y)
        elif self.method == "none":
            self.model = None
        else:
            raise ValueError(f"unknown calibration method {self.method!r}")
        return self

    def transform(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=float).reshape(-1)
        if self.method == "isotonic":
            out = self.model.predict(raw)
        elif self.method == "sigmoid":  # Platt: same as predict_proba, without sklearn overhead
            z = self.model.intercept_[0] + self.model.coef_[0, 0] * raw
            out = 1.0 / (1.0 + np.exp(-z))
        else:
            out = 1.0 / (1.0 + np.exp(-raw))
        return np.clip(np.asarray(out, dtype=float), 0.0, 1.0)


@dataclass
class RiskModel(PythonModel):
    """Calibrated deterioration-risk model; ``predict`` returns probabilities in [0, 1].

    ``categories`` maps each categorical feature to its category list; string inputs are
    encoded to the category index LightGBM was trained on (unknown -> missing).
    """

    booster: Any = None
    calibrator: Calibrator = field(default_factory=Calibrator)
    feature_names: list[str] = field(default_factory=list)
    categories: dict[str, list[str]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: the booster compiled to a library (``models.compiled``), once :meth:`compile_trees` ran
    compiled: Any = field(default=None, repr=False, compare=False)

    # -- pickling: the booster travels as model text in the ``booster`` artifact ----------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["booster"] = None
        state["compiled"] = None  # a loaded library is this machine's, this process's
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("compiled", None)  # models pickled before compiled trees

    def load_context(self, context: Any) -> None:
        import lightgbm as lgb

        path = context.artifacts.get(BOOSTER_ARTIFACT) if context is not None else None
        if path:
            self.booster = lgb.Booster(model_file=str(path))

    # -- scoring ----------------------------------------------------------------------------
    def prepare(self, X: pd.DataFrame | Mapping[str, Sequence[Any]]) -> pd.DataFrame:
        """Select ``feature_names`` in training order as floats; fail clearly on missing columns."""
        frame = X if isinstance(X, pd.DataFrame) else pd.DataFrame(X)
        missing = [c for c in self.feature_names if c not in frame.columns]
        if missing:
            raise ValueError(f"input is missing feature column(s): {missing}")
        cols: dict[str, pd.Series] = {}
        for name in self.feature_names:
            col = frame[name]
            cats = self.categories.get(name)
            if cats is not None and not pd.api.types.is_numeric_dtype(col):
                lookup = {c: float(i) for i, c in enumerate(cats)}
                cols[name] = col.astype("object").map(lookup).astype(float)
            else:
                cols[name] = pd.to_numeric(col, errors="coerce").astype(float)
        return pd.DataFrame(cols, index=frame.index, columns=self.feature_names)

    def matrix(self, X: pd.DataFrame | Mapping[str, Sequence[Any]]) -> np.ndarray:
        """Feature matrix as float64 numpy (fast path when every feature column is numeric)."""
        frame = X if isinstance(X, pd.DataFrame) else pd.DataFrame(X)
        try:
            sub = frame[self.feature_names]
        except KeyError:
            return self.prepare(frame).to_numpy(dtype=np.float64)
        if all(pd.api.types.is_numeric_dtype(t) for t in sub.dtypes):
            return sub.to_numpy(dtype=np.float64, na_value=np.nan)
        return self.prepare(frame).to_numpy(dtype=np.float64)

    def _predict(self, X: pd.DataFrame, **kwargs: Any) -> np.ndarray:
        if self.booster is None:
            raise RuntimeError("RiskModel has no booster loaded")
        frame = X if isinstance(X, pd.DataFrame) else pd.DataFrame(X)
        missing = [c for c in self.feature_names if c not in frame.columns]
        if missing:
            raise ValueError(f"input is missing feature column(s): {missing}")
        # one thread for small batches: OpenMP start-up dominates (ms vs µs per request)
        threads = 1 if len(frame) < SMALL_BATCH else 0
        dtype = matrix_dtype(frame, self.feature_names)
        parts = []
        for r in range(0, max(len(frame), 1), BLOCK_ROWS):
            X = feature_matrix(
                frame, self.feature_names, self.categories, slice(r, r + BLOCK_ROWS), dtype
            )
            if kwargs == {"raw_score": True}:
                parts.append(self.raw_matrix(X))
            else:
                parts.append(
                    np.asarray(self.booster.predict(X, num_threads=threads, **kwargs), float)
                )
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def raw_score(self, X: pd.DataFrame) -> np.ndarray:
        return self._predict(X, raw_score=True)

    # -- arrays: the scoring paths of the service (no DataFrame per call) -------------------
    def compile_trees(self, directory: Any = None) -> bool:
        """Score with compiled trees from now on, if they build and match LightGBM exactly
        (``models.compiled``); returns whether they are in use."""
        from models.compiled import compile_booster

        if self.booster is not None and self.compiled is None:
            self.compiled = compile_booster(self.booster, directory)
        return self.compiled is not None

    def raw_matrix(self, X: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Raw margins of a (rows x ``feature_names``) float matrix (compiled trees when in
        use and the batch is big enough; LightGBM with ``threads``, default: 1 for small
        batches, all cores for large ones)."""
        from models.compiled import MIN_ROWS

        if self.booster is None:
            raise RuntimeError("RiskModel has no booster loaded")
        compiled = self.compiled
        if compiled is not None and len(X) >= MIN_ROWS:
            raw = compiled.raw_score(X)
            if raw is not None:
                return np.asarray(raw)
        if threads is None:
            threads = 1 if len(X) < SMALL_BATCH else 0
        return np.asarray(self.booster.predict(X, raw_score=True, num_threads=threads), float)

    def predict_proba_matrix(self, X: np.ndarray, threads: int | None = None) -> np.ndarray:
        """Calibrated probabilities of a (rows x ``feature_names``) float matrix."""
        return self.calibrator.transform(self.raw_matrix(X, threads))

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """Calibrated probability of deterioration within the label horizon, one per row."""
        return self.calibrator.transform(self.raw_score(X))

    def contributions(self, X: pd.DataFrame) -> np.ndarray:
        """Per-feature SHAP contributions on the raw margin (LightGBM ``pred_contrib``).

        Shape ``(n_rows, len(feature_names) + 1)``; the last column is the bias (expected value).
        """
        return self._predict(X, pred_contrib=True)

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        return self.predict_proba(model_input)
