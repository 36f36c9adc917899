"""The local ``features`` stage as a stream: observations read in batches of rows, features
computed per chunk of whole patients on threads, rows written as soon as they are ready.

Why: reading (Arrow decodes), computing (compiled kernels, GIL released) and writing
(Parquet encodes) overlap on the cores, and the observations are never in memory at once:
the peak is a few chunks plus the writer's buffers. The values are those of
``compute_features`` on the whole table (the same executors on the same patient's rows; a
patient's features do not depend on the other patients of a call), which
``tests/features/test_dask_and_stage.py`` checks bit for bit.

It needs the observation rows grouped by patient (ingest writes them sorted by patient_id,
time, code) and prediction times that do not depend on the observations; otherwise
(:class:`NotStreamable`) the stage reads the whole table instead.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary
from features.build import (
    FeatureArrays,
    FeatureInputs,
    _sorted_distinct,
    feature_table,
    features_from_arrays,
    query_inputs,
    write_feature_table,
)
from features.config import FeaturesConfig
from features.labels import _ns, prevalence_by_setting

log = logging.getLogger(__name__)

#: rows per read batch (Arrow decodes a batch at a time, in a reader thread)
BATCH_ROWS = 1 << 19


class NotStreamable(Exception):
    """The observations cannot be streamed (not grouped by patient): read them whole."""


@dataclass
class _Batch:
    p: np.ndarray  # global patient index, -1 = a patient without prediction times
    c: np.ndarray
    t: np.ndarray
    v: np.ndarray


def _index_of(dictionary: Any, index: dict[str, int], dtype: Any) -> np.ndarray:
    """Positions of a batch dictionary's strings in ``index`` (-1 when absent)."""
    return np.array([index.get(str(x), -1) for x in dictionary.to_pylist()], dtype=dtype)


def read_batches(
    path: str | Path, pid_index: dict[str, int], code_index: dict[str, int], rows: int
) -> Iterator[_Batch]:
    """Observation rows as arrays, ``rows`` at a time, ids and codes as indices."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from core import storage

    pf = storage.parquet_file(path, read_dictionary=["patient_id", "code"])
    cdtype = np.int8 if len(code_index) < 127 else np.int16
    for rb in pf.iter_batches(batch_size=rows, columns=["patient_id", "time", "code", "value"]):
        pid, time, code, value = (rb.column(i) for i in range(4))
        pmap = _index_of(pid.dictionary, pid_index, np.int64)
        cmap = _index_of(code.dictionary, code_index, cdtype)
        if pid.null_count or code.null_count or time.null_count or value.null_count:
            # (the contract has no missing cells; such a row is unusable, not an error)
            p = pmap[pid.indices.fill_null(0).to_numpy()]
            c = cmap[code.indices.fill_null(0).to_numpy()]
            p[pid.is_null().to_numpy(zero_copy_only=False)] = -1
            c[code.is_null().to_numpy(zero_copy_only=False)] = -1
            t = time.cast(pa.int64()).fill_null(0).to_numpy()
            v = np.asarray(
                pc.if_else(time.is_null(), float("nan"), value.fill_null(float("nan"))).to_numpy()
            )
        else:  # zero-copy views of the Arrow buffers
            p = pmap[pid.indices.to_numpy()]
            c = cmap[code.indices.to_numpy()]
            t = time.cast(pa.int64()).to_numpy()
            v = value.to_numpy()
        keep = p >= 0  # rows of patients without prediction times are not needed
        if not keep.all():
            p, c, t, v = p[keep], c[keep], t[keep], v[keep]
        yield _Batch(p=p, c=c, t=t, v=v)


class _Chunks:
    """Rows of complete patients, cut into chunks without copying the batches: with rows
    grouped by patient, every patient before the last of a batch is complete once that batch
    is read. Each batch gives (at most) two chunks: the patient carried over from the batch
    before with its remaining rows (the only rows copied: one patient's), and the batch's
    complete patients after it (views of the batch). Chunks cover every patient index
    ``0..n_pat-1`` in order, patients without rows included."""

    def __init__(self, n_pat: int) -> None:
        self.n_pat = n_pat
        self.carry: _Batch | None = None  # rows of patient ``self.done`` read so far
        self.done = 0  # patients before this one were emitted

    def add(self, b: _Batch) -> Iterator[tuple[int, int, _Batch]]:
        p = b.p
        if not len(p):
            return
        if p[0] < 0 or bool((p[1:] < p[:-1]).any()):
            raise NotStreamable("observations are not grouped by patient")
        first, last = int(p[0]), int(p[-1])
        if first < self.done:
            raise NotStreamable("observations are not grouped by patient")
        if self.carry is not None and first == self.done:
            end = int(np.searchsorted(p, first, "right"))  # the carried patient's rows
            if end == len(p):  # the whole batch continues it
                self.carry = _cat(self.carry, b)
                return
            yield self.done, first + 1, _cat(self.carry, _slice(b, 0, end))
            self.done, self.carry, b, p = first + 1, None, _slice(b, end, len(p)), p[end:]
        cut = int(np.searchsorted(p, last, "left"))  # rows before the last patient's
        if self.carry is not None:  # the carried patient is complete: no rows in this batch
            yield self.done, self.done + 1, self.carry
            self.done, self.carry = self.done + 1, None
        if last > self.done:
            yield self.done, last, _slice(b, 0, cut)
            self.done = last
        self.carry = _slice(b, cut, len(p))

    def finish(self) -> Iterator[tuple[int, int, _Batch]]:
        if self.done < self.n_pat:
            rows = self.carry if self.carry is not None else _empty_batch()
            yield self.done, self.n_pat, rows
            self.done, self.carry = self.n_pat, None


def _slice(b: _Batch, lo: int, hi: int) -> _Batch:
    return _Batch(b.p[lo:hi], b.c[lo:hi], b.t[lo:hi], b.v[lo:hi])


def _cat(a: _Batch, b: _Batch) -> _Batch:
    return _Batch(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in "pctv"))


def _empty_batch() -> _Batch:
    return _Batch(np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int64), np.zeros(0))


def stream_features(
    observations_path: str | Path,
    patients: pd.DataFrame,
    labelled: pd.DataFrame,
    config: FeaturesConfig,
    vocab: Vocabulary,
    out_path: str | Path,
) -> tuple[int, dict[str, dict[str, float]]]:
    """Features + labels of the ``labelled`` times, written to ``out_path``; returns the
    number of rows and the prevalence by setting of the rows written."""
    if not _sorted_distinct(labelled["patient_id"].to_numpy(), _ns(labelled["time"])):
        labelled = labelled.drop_duplicates(["patient_id", "time"]).sort_values(
            ["patient_id", "time"], kind="stable"
        )
    if labelled.empty:  # nothing to stream: the whole-table path writes the empty table
        raise NotStreamable("no prediction times")
    q = query_inputs(patients, labelled, config, vocab)
    qp = np.asarray(q.query_patient)
    label = labelled["label"].to_numpy(dtype=np.int64)
    if len(qp) > 1 and bool((qp[1:] < qp[:-1]).any()):  # ids sort as strings: rows, too
        order = np.argsort(qp, kind="stable")
        qp, label = qp[order], label[order]
        q.query_time_ns = np.asarray(q.query_time_ns)[order]
    q_bounds = np.searchsorted(qp, np.arange(len(q.patient_ids) + 1))
    inner = config.model_copy(update={"threads": 1})
    threads = config.threads or os.cpu_count() or 1
    writer = _Writer(out_path)
    pending: queue.Queue[Future[Any] | None] = queue.Queue(maxsize=threads + 1)
    writer.start(pending)

    def compute(a: int, b: int, rows: _Batch) -> Any:
        inputs = FeatureInputs(
            patient_ids=q.patient_ids[a:b],
            obs_patient=rows.p - a,
            obs_code=rows.c,
            codes=q.codes,
            obs_time_ns=rows.t,
            obs_value=rows.v,
            query_patient=qp[q_bounds[a] : q_bounds[b]] - a,
            query_time_ns=np.asarray(q.query_time_ns)[q_bounds[a] : q_bounds[b]],
            patient_columns={k: v[a:b] for k, v in q.patient_columns.items()},
        )
        arrays: FeatureArrays = features_from_arrays(inputs, inner, vocab)
        return feature_table(arrays, label[q_bounds[a] : q_bounds[b]])

    chunks = _Chunks(len(q.patient_ids))
    pid_index = {p: i for i, p in enumerate(q.patient_ids.tolist())}
    code_index = {c: i for i, c in enumerate(q.codes)}
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for batch in read_batches(observations_path, pid_index, code_index, BATCH_ROWS):
                for a, b, rows in chunks.add(batch):
                    pending.put(pool.submit(compute, a, b, rows))
            for a, b, rows in chunks.finish():
                pending.put(pool.submit(compute, a, b, rows))
    finally:
        pending.put(None)
        writer.join()
    if writer.error is not None:
        raise writer.error
    if writer.rows != len(label):
        raise AssertionError(f"wrote {writer.rows} feature rows for {len(label)} prediction times")
    return writer.rows, prevalence_by_setting(labelled["setting"].to_numpy(), label)


#: feature rows per Parquet row group: chunk tables are buffered (zero-copy) up to this many
#: rows and written as one; each row group costs ~40 us per column of fixed overhead, and a
#: chunk of patients has only ~15 k rows
ROW_GROUP_ROWS = 1 << 16


class _Writer:
    """Writes the chunks' tables, in order, from a thread (Parquet encoding overlaps work)."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.rows = 0
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, pending: queue.Queue[Future[Any] | None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(pending,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _run(self, pending: queue.Queue[Future[Any] | None]) -> None:
        import pyarrow as pa

        writer = None
        buffered: list[Any] = []
        rows = 0
        try:
            while (fut := pending.get()) is not None:
                if self.error is not None:
                    continue  # drain: the producer is stopping
                table = fut.result()
                buffered.append(table)
                rows += table.num_rows
                if rows >= ROW_GROUP_ROWS:
                    writer = write_feature_table(pa.concat_tables(buffered), self.path, writer)
                    self.rows += rows
                    buffered, rows = [], 0
            if buffered and self.error is None:
                writer = write_feature_table(pa.concat_tables(buffered), self.path, writer)
                self.rows += rows
        except BaseException as exc:  # surfaced by stream_features
            self.error = exc
            while pending.get() is not None:
                pass
        finally:
            if writer is not None:
                writer.close()


__all__ = ["NotStreamable", "stream_features"]
