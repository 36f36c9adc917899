"""Patient-disjoint splits: no patient contributes rows to two of train / validation / test.

Why by patient: rows of one patient are strongly correlated (the same physiology scored every
few hours); a row-level split leaks and inflates every metric.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd

from models.config import SplitConfig

log = logging.getLogger(__name__)

TRAIN, VAL, TEST = "train", "val", "test"


def _patient_table(frame: pd.DataFrame) -> pd.DataFrame:
    return (
        frame.groupby("patient_id", sort=True)
        .agg(event=("label", "max"), first_time=("time", "min"))
        .reset_index()
    )


def _stratified_patient_split(
    patients: pd.DataFrame, size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    strat = patients["event"] if patients["event"].nunique() > 1 else None
    if strat is not None and patients["event"].value_counts().min() < 2:
        strat = None
    a, b = train_test_split(
        patients["patient_id"].to_numpy(), test_size=size, random_state=seed, stratify=strat
    )
    return np.asarray(a), np.asarray(b)


def assign_splits(frame: pd.DataFrame, config: SplitConfig, seed: int) -> pd.Series:
    """Return a ``split`` label (train/val/test) per row of ``frame``.

    ``patient``: patients drawn at random, stratified by whether they ever have an event.
    ``temporal``: patients ordered by their first prediction time; the latest ``test_size``
    fraction is the test set (train on earlier, test on later), validation drawn at random
    from the rest.
    """
    patients = _patient_table(frame)
    if len(patients) < 3:
        raise ValueError(f"need at least 3 patients to split, got {len(patients)}")
    if config.method == "temporal":
        ordered = patients.sort_values(["first_time", "patient_id"])
        n_test = max(1, round(len(ordered) * config.test_size))
        test_ids = ordered["patient_id"].to_numpy()[-n_test:]
        rest = ordered.iloc[:-n_test]
    else:
        rest_ids, test_ids = _stratified_patient_split(patients, config.test_size, seed)
        rest = patients[patients["patient_id"].isin(rest_ids)]
    train_ids, val_ids = _stratified_patient_split(rest, config.val_size, seed + 1)
    mapping = pd.Series(TRAIN, index=pd.Index(patients["patient_id"]))
    mapping.loc[val_ids] = VAL
    mapping.loc[test_ids] = TEST
    split = frame["patient_id"].map(mapping)
    log.info(
        "split %s: %s patients train/val/test = %d/%d/%d",
        config.method,
        len(patients),
        len(train_ids),
        len(val_ids),
        len(test_ids),
    )
    return split.rename("split")


def grouped_folds(
    frame: pd.DataFrame, n_splits: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stratified grouped K-fold indices (positional), grouped by patient."""
    from sklearn.model_selection import StratifiedGroupKFold

    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    yield from cv.split(frame, frame["label"].to_numpy(), frame["patient_id"].to_numpy())
