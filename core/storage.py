"""Where stage inputs and outputs live: a local path or any fsspec URL (``s3://``, ``gs://``, ...).

Why one module: every stage opens, reads, writes and checks its files through these functions,
so a stage pointed at ``s3://bucket/prefix`` instead of ``artifacts/`` runs the same code. Local
paths take exactly the calls they took before (pandas / pyarrow on the path), so the embedded
default stays bit-identical. URLs go through fsspec (s3fs for ``s3://``); the S3 endpoint and
region come from the environment (``AWS_ENDPOINT_URL_S3``, ``AWS_DEFAULT_REGION``: ``vitalrisk
team env`` exports them from ``team.env``), credentials from the environment only (botocore's
own chain: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role), so
:func:`storage_options` never holds a secret and can be shipped to Dask workers.

Observations can be a Hive-partitioned Parquet dataset: a directory ``observations.parquet/``
with one ``patient_bucket=NN/`` folder per bucket of a stable hash of the pseudonymous id
(:func:`patient_bucket`), so a task that owns a bucket reads only that folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from core.errors import UserError

PathLike = str | Path
#: partition column of a Hive-partitioned observations dataset
BUCKET_COLUMN = "patient_bucket"
#: the number of buckets, beside the partitions (Parquet readers skip names starting with "_")
BUCKETS_FILE = "_buckets"


class StorageConfig(BaseModel):
    """``params.yaml`` section ``storage``: how the ingest stage lays out observations."""

    model_config = ConfigDict(extra="forbid")

    #: file: one ``observations.parquet`` | partitioned: ``observations.parquet/patient_bucket=NN/``
    observations_layout: Literal["file", "partitioned"] = "file"
    #: buckets of the stable patient hash (partitioned layout): one Dask task reads one bucket
    patient_buckets: int = Field(default=16, ge=1, le=4096)


# -- locations -------------------------------------------------------------------------------


def is_url(path: PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a local path stays a local path)."""
    s = str(path)
    if "://" not in s:
        return False
    return s.split("://", 1)[0].lower() not in ("", "file")


def join(base: PathLike, *parts: str) -> PathLike:
    """``base / part / ...``: a ``Path`` for local bases, a ``/``-joined URL string otherwise."""
    if not is_url(base):
        return Path(base, *parts)
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def name(path: PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else Path(path).name


def parent(path: PathLike) -> PathLike:
    if not is_url(path):
        return Path(path).parent
    return str(path).rstrip("/").rsplit("/", 1)[0]


def storage_options(path: PathLike, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """fsspec options of ``path`` from the environment: endpoint and region, never secrets."""
    if not is_url(path):
        return {}
    env = os.environ if environ is None else environ
    protocol = str(path).split("://", 1)[0].lower()
    opts: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
        if region:
            opts["client_kwargs"] = {"region_name": region}
        # another process (a Dask worker, the next stage) may have written since the last listing
        opts["use_listings_cache"] = False
    return opts


def filesystem(path: PathLike, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL or a local path."""
    import fsspec

    opts = dict(storage_options(path) if options is None else options)
    with _named(path, "open the storage of"):
        fs, inner = fsspec.core.url_to_fs(str(path), **opts)
    return fs, inner


def arrow_filesystem(
    path: PathLike, options: Mapping[str, Any] | None = None
) -> tuple[Any | None, str]:
    """(pyarrow filesystem or None for a local path, path inside it) for pyarrow's readers."""
    if not is_url(path):
        return None, str(path)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, inner = filesystem(path, options)
    return PyFileSystem(FSSpecHandler(fs)), inner


@contextmanager
def _named(path: PathLike, what: str) -> Iterator[None]:
    """Storage errors (missing file, no credentials, endpoint down) as one line naming the URL."""
    try:
        yield
    except (FileNotFoundError, UserError):
        raise
    except Exception as exc:
        module = type(exc).__module__.split(".")[0]
        if isinstance(exc, OSError | PermissionError) or module in ("botocore", "aiobotocore"):
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{path}: cannot {what} it: {first}") from None
        raise


# -- files -----------------------------------------------------------------------------------


def exists(path: PathLike, options: Mapping[str, Any] | None = None) -> bool:
    if not is_url(path):
        return Path(path).exists()
    fs, inner = filesystem(path, options)
    with _named(path, "check"):
        return bool(fs.exists(inner))


def is_dir(path: PathLike, options: Mapping[str, Any] | None = None) -> bool:
    if not is_url(path):
        return Path(path).is_dir()
    fs, inner = filesystem(path, options)
    with _named(path, "check"):
        return bool(fs.isdir(inner))


def makedirs(path: PathLike, options: Mapping[str, Any] | None = None) -> None:
    """A local directory (parents too); for object stores nothing (prefixes need no creation)."""
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike, options: Mapping[str, Any] | None = None) -> None:
    """Delete a file or a directory tree if it exists (a stage replaces its old output)."""
    if not is_url(path):
        import shutil

        p = Path(path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        return
    fs, inner = filesystem(path, options)
    with _named(path, "delete"):
        if fs.exists(inner):
            fs.rm(inner, recursive=True)


def list_files(
    path: PathLike, suffix: str = "", options: Mapping[str, Any] | None = None
) -> list[str]:
    """Files under ``path`` (recursive), sorted; full URLs for URLs, paths for local paths."""
    if not is_url(path):
        return sorted(str(p) for p in Path(path).rglob(f"*{suffix}") if p.is_file())
    fs, inner = filesystem(path, options)
    with _named(path, "list"):
        found = fs.find(inner)
    protocol = str(path).split("://", 1)[0]
    return sorted(f"{protocol}://{f}" for f in found if f.endswith(suffix))


def list_sizes(
    url: PathLike, suffix: str = "", options: Mapping[str, Any] | None = None
) -> list[tuple[str, int]]:
    """``(URL, size)`` of the objects under ``url`` (recursive), sorted; [] if there are none."""
    fs, inner = filesystem(url, options)
    protocol = str(url).split("://", 1)[0]
    with _named(url, "list"):
        try:
            found = fs.find(inner, detail=True)
        except FileNotFoundError:
            return []
    return [
        (f"{protocol}://{key}", int(info.get("size") or 0))
        for key, info in sorted(found.items())
        if key.endswith(suffix)
    ]


def download(url: PathLike, dest: Path, options: Mapping[str, Any] | None = None) -> Path:
    """Copy a file or a folder tree at ``url`` to the local ``dest`` (which must not exist).

    For readers that need local files (the raw-format readers of ingest walk folders, detect
    formats by extension and header, and name each file in their report).
    """
    fs, inner = filesystem(url, options)
    with _named(url, "download"):
        if not fs.exists(inner):
            raise FileNotFoundError(f"{url}: not found")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if fs.isdir(inner):
            dest.mkdir()
            for f in fs.find(inner):
                rel = f[len(inner.rstrip("/")) + 1 :]
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f, str(target))
        else:
            fs.get_file(inner, str(dest))
    return dest


def open_file(
    path: PathLike, mode: str = "rb", options: Mapping[str, Any] | None = None
) -> IO[Any]:
    if not is_url(path):
        return open(path, mode)
    fs, inner = filesystem(path, options)
    with _named(path, "open"):
        handle: IO[Any] = fs.open(inner, mode)
    return handle


def read_text(path: PathLike, options: Mapping[str, Any] | None = None) -> str:
    if not is_url(path):
        return Path(path).read_text(encoding="utf-8")
    with open_file(path, "rb", options) as fh:
        return bytes(fh.read()).decode("utf-8")


def write_bytes(path: PathLike, data: bytes, options: Mapping[str, Any] | None = None) -> None:
    """One object written whole (an object store makes it visible only once complete); any
    failure, the upload at close included, is one error naming the URL. Local paths: a plain
    write (callers that need atomic local files write a temp file and rename it)."""
    if not is_url(path):
        Path(path).write_bytes(data)
        return
    fs, inner = filesystem(path, options)
    with _named(path, "write"):
        fs.pipe_file(inner, data)


def write_text(path: PathLike, text: str, options: Mapping[str, Any] | None = None) -> None:
    if not is_url(path):
        Path(path).write_text(text, encoding="utf-8")
        return
    with open_file(path, "wb", options) as fh:
        fh.write(text.encode("utf-8"))


# -- Parquet ---------------------------------------------------------------------------------


def read_parquet(
    path: PathLike,
    columns: list[str] | None = None,
    filters: Any = None,
    options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """A Parquet file or dataset directory as a frame (``pd.read_parquet`` for local paths)."""
    kwargs: dict[str, Any] = {}
    if columns is not None:
        kwargs["columns"] = columns
    if filters is not None:
        kwargs["filters"] = filters
    if not is_url(path):
        return pd.read_parquet(path, **kwargs)
    fs, inner = arrow_filesystem(path, options)
    with _named(path, "read"):
        return pd.read_parquet(inner, filesystem=fs, **kwargs)


def read_table(
    path: PathLike,
    columns: list[str] | None = None,
    filters: Any = None,
    read_dictionary: list[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """``pyarrow.parquet.read_table`` of a file or dataset directory, local or at a URL."""
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path, options)
    with _named(path, "read"):
        return pq.read_table(
            inner,
            columns=columns,
            filters=filters,
            read_dictionary=read_dictionary,
            filesystem=fs,
        )


def parquet_file(path: PathLike, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """``pyarrow.parquet.ParquetFile`` of one file (row-group and batch reads)."""
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path, options)
    with _named(path, "read"):
        return pq.ParquetFile(inner, filesystem=fs, **kwargs)


def parquet_writer(
    path: PathLike, schema: Any, options: Mapping[str, Any] | None = None, **kwargs: Any
) -> Any:
    """``pyarrow.parquet.ParquetWriter`` on a local path or a URL."""
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path, options)
    with _named(path, "write"):
        return pq.ParquetWriter(inner, schema, filesystem=fs, **kwargs)


def write_parquet(
    frame: pd.DataFrame, path: PathLike, options: Mapping[str, Any] | None = None
) -> None:
    """``frame.to_parquet(path, index=False)``, at a URL through fsspec."""
    if not is_url(path):
        frame.to_parquet(path, index=False)
        return
    fs, inner = arrow_filesystem(path, options)
    with _named(path, "write"):
        frame.to_parquet(inner, index=False, filesystem=fs)


def parquet_columns(path: PathLike, options: Mapping[str, Any] | None = None) -> list[str]:
    """Column names of a Parquet file or dataset (reads the footer / schema only)."""
    import pyarrow.dataset as ds

    fs, inner = arrow_filesystem(path, options)
    with _named(path, "read"):
        names: list[str] = ds.dataset(inner, format="parquet", filesystem=fs).schema.names
    return names


# -- patient-bucketed observations -----------------------------------------------------------


def patient_bucket(patient_ids: Iterable[str] | np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket of each id: a stable hash (blake2b), the same in every process and run."""
    ids = np.asarray(list(patient_ids) if not isinstance(patient_ids, np.ndarray) else patient_ids)
    uniq, inv = np.unique(ids.astype(str), return_inverse=True)
    per = np.array(
        [
            int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "big") % n_buckets
            for u in uniq.tolist()
        ],
        dtype=np.int64,
    )
    return per[inv] if len(uniq) else np.zeros(0, dtype=np.int64)


def bucket_dir(base: PathLike, bucket: int) -> PathLike:
    return join(base, f"{BUCKET_COLUMN}={bucket:04d}")


def write_bucketed(
    frame: pd.DataFrame,
    path: PathLike,
    n_buckets: int,
    options: Mapping[str, Any] | None = None,
) -> list[int]:
    """Hive-partitioned Parquet: ``path/patient_bucket=NNNN/part-0.parquet`` per non-empty
    bucket, rows in their input order (ingest's patient/time/code order); the buckets written.

    Deterministic (the same frame gives the same files), so DVC caches it like a single file.
    """
    remove(path, options)
    makedirs(path, options)
    buckets = patient_bucket(frame["patient_id"].to_numpy(), n_buckets)
    written = []
    for b in np.unique(buckets).tolist():
        part = frame[buckets == b]
        d = bucket_dir(path, int(b))
        makedirs(d, options)
        write_parquet(part, join(d, "part-0.parquet"), options)
        written.append(int(b))
    write_text(join(path, BUCKETS_FILE), f"{n_buckets}\n", options)
    return written


def buckets_of(path: PathLike, options: Mapping[str, Any] | None = None) -> dict[int, PathLike]:
    """Bucket -> folder of a Hive-partitioned dataset at ``path`` (empty for a plain file)."""
    if not is_dir(path, options):
        return {}
    prefix = f"{BUCKET_COLUMN}="
    out: dict[int, PathLike] = {}
    for f in list_files(path, ".parquet", options):
        folder = parent(f)
        label = name(folder)
        if label.startswith(prefix):
            out[int(label[len(prefix) :])] = folder
    return dict(sorted(out.items()))


def bucket_count(path: PathLike, options: Mapping[str, Any] | None = None) -> int | None:
    """The number of buckets a dataset was written with (recorded beside it), None for a file."""
    meta = join(path, BUCKETS_FILE)
    if not exists(meta, options):
        return None
    return int(read_text(meta, options).strip())
