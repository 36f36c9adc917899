"""Train a calibrated LightGBM deterioration model on a patient-disjoint split.

Why these choices:
* **Patient-disjoint train/validation/test** (``models.splits``) so nothing leaks between rows
  of one patient; grouped K-fold on train+validation reports CV discrimination.
* **Early stopping on validation** picks the number of trees; the final booster is fitted on
  the training patients only, because the validation patients are then used to fit the
  **calibrator** and the **alert threshold** (held-out data, not the rows the trees saw).
* **Class imbalance** via ``scale_pos_weight`` (or ``is_unbalance``) inflates raw scores;
  calibration afterwards maps them back to probabilities.
* **Determinism**: fixed seeds, ``deterministic=True``, ``force_row_wise`` and a fixed thread
  count give identical boosters (and metrics) on re-run with the local backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from models.config import TrainConfig
from models.metrics import Exposure, auprc, auroc, cadence_hours
from models.pyfunc import BLOCK_ROWS, Calibrator, RiskModel, feature_matrix, matrix_dtype
from models.splits import TEST, TRAIN, VAL, assign_splits, grouped_folds
from models.thresholds import METADATA_KEY, fit_thresholds

log = logging.getLogger(__name__)

ID_COLUMNS = ("patient_id", "time", "setting", "label", "event_time")


@dataclass
class TrainResult:
    model: RiskModel
    split: pd.Series
    best_iteration: int
    lgb_params: dict[str, Any]
    threshold: float
    cadence_hours: float | None
    cv: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float | None] = field(default_factory=dict)
    #: raw scores of every row of the training frame, when the Dask workers computed them
    #: (the frame then holds the row keys only)
    scored: np.ndarray | None = None
    #: the signature's input example, when the workers computed it
    example: pd.DataFrame | None = None

    def predictions(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Per-row scores for every split (keys are pseudonyms; no raw identifiers)."""
        keep = [
            c
            for c in (
                "patient_id",
                "time",
                "setting",
                "label",
                "news2_total",
                "age",
                "sex_f",
                "event_time",
            )
            if c in frame.columns
        ]
        out = frame[keep].copy()
        out["split"] = self.split.to_numpy()
        out["raw_score"] = self.scored if self.scored is not None else self.model.raw_score(frame)
        out["prob"] = self.model.calibrator.transform(out["raw_score"].to_numpy())
        return out.reset_index(drop=True)


def validate_frame(frame: pd.DataFrame) -> None:
    missing = [c for c in ("patient_id", "time", "label") if c not in frame.columns]
    if missing:
        raise ValueError(f"feature frame is missing column(s) {missing}")
    labels = set(pd.unique(frame["label"].dropna()))
    if not labels <= {0, 1}:
        raise ValueError(f"column 'label' must be 0/1, found {sorted(labels)[:5]}")
    if frame["label"].isna().any():
        raise ValueError(f"column 'label' has {int(frame['label'].isna().sum())} missing values")
    if frame["label"].nunique() < 2:
        raise ValueError("column 'label' has a single class; cannot train a classifier")


def select_features(
    frame: pd.DataFrame, config: TrainConfig, schema: pd.DataFrame | None = None
) -> tuple[list[str], dict]:
    """Feature columns in order, and category lists of the categorical ones.

    Default: every numeric column that is not an identifier/label, plus ``categorical_features``.
    ``schema``: the matrix's columns and dtypes (an empty frame) when ``frame`` holds only the
    row keys and the categorical columns (``train.backend: dask`` near the data).
    """
    cats = list(config.categorical_features)
    columns = frame if schema is None else schema
    if config.features:
        names = list(config.features)
    else:
        names = [
            c
            for c in columns.columns
            if c not in ID_COLUMNS
            and (pd.api.types.is_numeric_dtype(columns[c]) or c in cats)
            and not pd.api.types.is_bool_dtype(columns[c])
        ]
        names += [c for c in columns.columns if pd.api.types.is_bool_dtype(columns[c])]
        names += [c for c in cats if c not in names]
    names = [c for c in names if c not in set(config.exclude_features)]
    missing = [c for c in names if c not in columns.columns]
    missing += [c for c in cats if c not in frame.columns and c not in missing]
    if missing:
        raise ValueError(f"configured feature column(s) not in the feature frame: {missing}")
    unknown_mono = [c for c in config.monotone_constraints if c not in names]
    if unknown_mono:
        raise ValueError(f"train.monotone_constraints names unknown feature(s) {unknown_mono}")
    categories: dict[str, list[str]] = {}
    for c in cats:
        col = frame[c]
        if not pd.api.types.is_numeric_dtype(col):
            categories[c] = sorted(str(v) for v in pd.unique(col.dropna()))
        else:
            categories[c] = []  # already integer-coded
    return names, categories


def _class_weight_params(y: np.ndarray, config: TrainConfig) -> dict[str, Any]:
    if config.imbalance == "scale_pos_weight":
        pos = max(int(y.sum()), 1)
        return {"scale_pos_weight": float((len(y) - pos) / pos)}
    if config.imbalance == "is_unbalance":
        return {"is_unbalance": True}
    return {}


def _booster_params(
    config: TrainConfig, y: np.ndarray, names: list[str], overrides: dict[str, Any] | None
) -> dict[str, Any]:
    params = config.lgb_params()
    params.update(_class_weight_params(y, config))
    if config.monotone_constraints:
        params["monotone_constraints"] = [config.monotone_constraints.get(n, 0) for n in names]
        params["monotone_constraints_method"] = "advanced"
    params.update(overrides or {})
    return params


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``).

    LightGBM bins from a sample of rows (200,000 by default) copied into many small vectors;
    freed, they stay in the process's heap: measured 520 MB kept after binning 160 k x 312,
    55 MB after trimming. Elsewhere a no-op."""
    import contextlib
    import ctypes
    import ctypes.util
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def dataset_params(params: dict[str, Any]) -> dict[str, Any]:
    """Booster params plus ``feature_pre_filter=False``: the one binned Dataset serves every
    fit (tuning trials change ``min_child_samples``, which pre-filtering would freeze)."""
    return {**params, "feature_pre_filter": False}


@dataclass
class TrainingData:
    """The frame's features binned once, for every fit of one training run.

    Why: the matrix is built once as float32 (the features stage's dtype) straight from the
    frame's columns, binned by LightGBM on the training and validation rows (never test
    rows) and released; the train, validation and cross-validation sets are subsets of that
    binned Dataset, and predictions read the frame in blocks of rows. So the raw feature
    values exist once in the frame and once, briefly, as the matrix: no float64 copy, no
    per-fold copies, one binning instead of one per fit.
    """

    frame: pd.DataFrame
    names: list[str]
    categories: dict[str, list[str]]
    y: np.ndarray
    split: np.ndarray
    fit_rows: np.ndarray  # frame positions binned (train + validation)
    dataset: Any  # lightgbm.Dataset over fit_rows
    dtype: type[np.floating]

    @classmethod
    def build(
        cls,
        frame: pd.DataFrame,
        names: list[str],
        categories: dict[str, list[str]],
        split: np.ndarray,
        params: dict[str, Any],
    ) -> TrainingData:
        import lightgbm as lgb

        y = frame["label"].to_numpy().astype(np.int64)
        fit_rows = np.flatnonzero(split != TEST)
        dtype = matrix_dtype(frame, names)
        X = feature_matrix(frame, names, categories, fit_rows, dtype)
        cat_idx = [names.index(c) for c in categories]
        dataset = lgb.Dataset(
            X,
            label=y[fit_rows],
            feature_name=list(names),
            categorical_feature=cat_idx or "auto",
            params=dataset_params(params),
            free_raw_data=True,
        ).construct()
        del X  # binned: the raw matrix is not needed any more
        release_freed_memory()
        return cls(frame, names, categories, y, split, fit_rows, dataset, dtype)

    def subset(self, rows: np.ndarray) -> Any:
        """The binned Dataset of frame positions ``rows`` (all among ``fit_rows``)."""
        pos = np.searchsorted(self.fit_rows, rows)
        if not (len(rows) and np.array_equal(self.fit_rows[pos], rows)):
            raise ValueError("subset rows must be training or validation rows")
        return self.dataset.subset(pos.astype(np.int32))

    def raw_score(self, booster: Any, rows: np.ndarray) -> np.ndarray:
        """Raw margins of frame positions ``rows``, matrix built a block at a time."""
        out = np.empty(len(rows))
        for r in range(0, len(rows), BLOCK_ROWS):
            block = rows[r : r + BLOCK_ROWS]
            X = feature_matrix(self.frame, self.names, self.categories, block, self.dtype)
            out[r : r + len(block)] = booster.predict(X, raw_score=True)
        return out


def fit_booster(
    train_set: Any,
    valid_set: Any,
    params: dict[str, Any],
    num_rounds: int,
    early_stopping_rounds: int,
) -> Any:
    """LightGBM on a (subset) Dataset; early stopping on ``valid_set`` when given."""
    import lightgbm as lgb

    valid_sets: list[Any] = []
    callbacks: list[Any] = []
    if valid_set is not None and early_stopping_rounds > 0:
        valid_sets = [valid_set]
        callbacks = [
            lgb.early_stopping(early_stopping_rounds, first_metric_only=True, verbose=False)
        ]
    return lgb.train(
        params, train_set, num_boost_round=num_rounds, valid_sets=valid_sets, callbacks=callbacks
    )


def _fit_dask(
    X_tr: pd.DataFrame,
    y_tr: np.ndarray,
    params: dict[str, Any],
    num_rounds: int,
    categorical: list[str],
    config: TrainConfig,
    client: Any,
) -> Any:
    """Distributed fit of a frame the client holds (sent to the workers); the booster.

    lightgbm.dask has no early stopping: the configured ``n_estimators`` trees are grown.
    """
    import dask.dataframe as dd

    n_parts = max(1, len(client.scheduler_info().get("workers", {})) or config.dask_workers)
    Xd = dd.from_pandas(X_tr, npartitions=n_parts)
    yd = dd.from_pandas(pd.Series(y_tr, index=X_tr.index, name="label"), npartitions=n_parts)
    from models.dask_store import dask_classifier

    clf = dask_classifier(params, num_rounds, config, client)
    clf.fit(Xd, yd, categorical_feature=categorical or "auto")
    return clf.booster_


def dask_client(config: TrainConfig) -> tuple[Any, Any]:
    """(client, cluster-or-None): scheduler from params/env, else a LocalCluster we own."""
    import os

    from distributed import Client, LocalCluster

    address = (
        config.dask_scheduler
        or os.environ.get("VITALRISK_DASK_SCHEDULER")
        or os.environ.get("DASK_SCHEDULER_ADDRESS")
    )
    if address:
        return Client(address), None
    cluster = LocalCluster(
        n_workers=config.dask_workers,
        threads_per_worker=config.num_threads,
        processes=True,
        dashboard_address=None,
    )
    return Client(cluster), cluster


def cross_validate(
    data: TrainingData,
    config: TrainConfig,
    num_rounds: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Grouped (by patient) stratified K-fold AUROC/AUPRC on the training + validation rows."""
    if config.cv_folds < 2:
        return {}
    rows = data.fit_rows
    sub = data.frame[["patient_id", "label"]].iloc[rows].reset_index(drop=True)
    y = data.y[rows]
    aurocs, auprcs = [], []
    for tr, te in grouped_folds(sub, config.cv_folds, config.seed):
        params = _booster_params(config, y[tr], data.names, overrides)
        b = fit_booster(data.subset(rows[tr]), None, params, num_rounds, 0)
        s = data.raw_score(b, rows[te])
        a, p = auroc(y[te], s), auprc(y[te], s)
        if a is not None:
            aurocs.append(a)
        if p is not None:
            auprcs.append(p)
    out = {"cv_folds": float(config.cv_folds)}
    if aurocs:
        out |= {"cv_auroc_mean": float(np.mean(aurocs)), "cv_auroc_sd": float(np.std(aurocs))}
    if auprcs:
        out |= {"cv_auprc_mean": float(np.mean(auprcs)), "cv_auprc_sd": float(np.std(auprcs))}
    return out


def train_model(
    frame: pd.DataFrame,
    config: TrainConfig,
    overrides: dict[str, Any] | None = None,
    client: Any = None,
    metadata: dict[str, Any] | None = None,
    features_path: str | None = None,
    schema: pd.DataFrame | None = None,
) -> TrainResult:
    """Split, fit (local or Dask), early-stop, calibrate and pick the alert threshold.

    ``overrides`` replaces LightGBM parameters (used by tuning). With ``backend='dask'`` and no
    ``client`` given, a client is created from ``dask_client`` and closed afterwards; with
    ``features_path`` (the file ``frame`` was read from) the workers read the training rows
    from it themselves instead of receiving them from this process. With ``schema`` too (the
    matrix's columns, ``features.io.feature_schema``), ``frame`` needs only the row keys, the
    label and the categorical columns: the workers also score every row (``models.dask_store``).
    """
    validate_frame(frame)
    if not isinstance(frame.index, pd.RangeIndex) or frame.index.start != 0:
        frame = frame.reset_index(drop=True)
    names, categories = select_features(frame, config, schema)
    categorical = list(categories)
    model = RiskModel(feature_names=names, categories=categories)
    y = frame["label"].astype(int).to_numpy()
    split = assign_splits(frame, config.split, config.seed)
    split_arr = split.to_numpy()
    tr, va = split_arr == TRAIN, split_arr == VAL
    if y[tr].sum() == 0 or y[va].sum() == 0:
        raise ValueError("train or validation split has no positive labels; need more events")
    params = _booster_params(config, y[tr], names, overrides)

    data: TrainingData | None = None
    scored: np.ndarray | None = None
    example: pd.DataFrame | None = None
    if config.backend == "dask":
        from models import dask_store

        near_data = features_path is not None and schema is not None
        if schema is not None and features_path is None:
            raise ValueError("a schema without features_path: the workers have nothing to read")
        own = client is None
        cluster = None
        if own:
            client, cluster = dask_client(config)
        try:
            if features_path is not None:
                train_ids = sorted(set(frame["patient_id"][tr].astype(str)))
                booster = dask_store.fit_from_store(
                    features_path,
                    train_ids,
                    int(tr.sum()),
                    names,
                    categories,
                    params,
                    config.n_estimators,
                    config,
                    client,
                )
            else:
                X = model.prepare(frame)
                booster = _fit_dask(
                    X[tr], y[tr], params, config.n_estimators, categorical, config, client
                )
            if near_data:
                assert features_path is not None
                scored, example = dask_store.score_rows(
                    features_path, frame, booster, names, categories, train_ids, client
                )
        finally:
            if own:
                client.close()
                if cluster is not None:
                    cluster.close()
        best = booster.current_iteration()
        if scored is not None:
            raw_va = scored[va]
        else:
            model.booster = booster
            raw_va = model.raw_score(frame[va])
    else:
        data = TrainingData.build(frame, names, categories, split_arr, params)
        booster = fit_booster(
            data.subset(np.flatnonzero(tr)),
            data.subset(np.flatnonzero(va)),
            params,
            config.n_estimators,
            config.early_stopping_rounds,
        )
        best = int(booster.best_iteration or booster.current_iteration())
        if booster.best_iteration and booster.best_iteration < booster.current_iteration():
            # keep only the trees early stopping chose, so the model text is self-contained
            booster = booster.__class__(model_str=booster.model_to_string(num_iteration=best))
        raw_va = data.raw_score(booster, np.flatnonzero(va))
    model.booster = booster
    model.calibrator = Calibrator(config.calibration).fit(raw_va, y[va])
    p_va = model.calibrator.transform(raw_va)

    cadence = cadence_hours(frame)
    exposure_va = Exposure.of(frame[["patient_id", "time"]][va], cadence)
    thresholds = fit_thresholds(
        p_va,
        exposure_va,
        config.alert_budget_per_100_patient_days,
        config.watch_budget_per_100_patient_days,
    )
    threshold = thresholds.high  # the alert-budget threshold is "high"
    val_metrics = {
        "val_auroc": auroc(y[va], p_va),
        "val_auprc": auprc(y[va], p_va),
        "val_prevalence": float(y[va].mean()),
    }
    cv = cross_validate(data, config, best, overrides) if data is not None else {}
    del data  # the binned Dataset and its subsets
    model.metadata = {
        **(metadata or {}),
        "threshold": threshold,
        METADATA_KEY: thresholds.as_dict(),
        "alert_budget": config.alert_budget_per_100_patient_days,
        "alert_budget_unit": exposure_va.unit,
        "cadence_hours": cadence,
        "best_iteration": best,
        "calibration": config.calibration,
        "compiled_trees": config.compiled_trees,
        "n_train_rows": int(tr.sum()),
        "n_val_rows": int(va.sum()),
        "n_test_rows": int((split == TEST).sum()),
    }
    log.info(
        "trained %d trees on %d rows (%d features); val AUPRC %.3f; threshold %.4f",
        best,
        int(tr.sum()),
        len(names),
        val_metrics["val_auprc"] or float("nan"),
        threshold,
    )
    return TrainResult(
        model=model,
        split=split,
        best_iteration=best,
        lgb_params=params,
        threshold=threshold,
        cadence_hours=cadence,
        cv=cv,
        val_metrics=val_metrics,
        scored=scored,
        example=example,
    )
