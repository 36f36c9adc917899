"""Data lake on the team stack: ingest -> features with every path at s3:// (the moto stand-in),
observations as patient-bucketed Hive Parquet, and the Dask backend on the stack's cluster
reading and writing the object store; each compared with the same stages on local paths."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from core import storage
from features.io import read_features
from ops.services import s3_client
from ops.settings import TeamSettings
from pipelines.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _params(path: Path, **storage_section: object) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["simulate"].update(n_patients=60, event_rate=0.3)  # ~7 patients with events
    params["storage"].update(storage_section)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _stages(
    data: Path | str, base: str | Path, params: Path, extra: list[str] | None = None
) -> None:
    """The ingest and features stages with the paths dvc.yaml gives them, under ``base``."""
    j = storage.join
    rc = main(
        [
            "ingest",
            str(data),
            "--out",
            str(j(base, "observations")),
            "--quarantine",
            str(j(base, "quarantine")),
            "--report",
            str(j(base, "reports", "ingest.json")),
            "--params",
            str(params),
            "--quiet",
        ]
    )
    assert rc == 0
    args = ["--observations", str(j(base, "observations")), "--out", str(j(base, "features"))]
    assert main(["features", *args, "--params", str(params), *(extra or [])]) == 0


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny simulated cohort and the two stages on local paths (the embedded default)."""
    root = tmp_path_factory.mktemp("lake")
    params = _params(root / "params.yaml")
    assert main(["simulate", "--out", str(root / "data"), "--params", str(params)]) == 0
    _stages(root / "data", root / "local", params)
    return root, params


def _keys(settings: TeamSettings, env: dict[str, str], prefix: str) -> list[str]:
    bucket, key = prefix.removeprefix("s3://").split("/", 1)
    s3 = s3_client(settings, env)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
    return sorted(o["Key"][len(key) + 1 :] for page in pages for o in page.get("Contents", []))


def _sorted_obs(frame: pd.DataFrame) -> pd.DataFrame:
    cols = ["patient_id", "time", "code", "value", "source"]
    out = frame[[c for c in frame.columns if c != storage.BUCKET_COLUMN]].astype({"code": str})
    return out.sort_values([c for c in cols if c in out], kind="stable", ignore_index=True)


def _same_reports(local: Path, remote: str) -> None:
    for name in ("features/feature_dictionary.json", "features/features_report.json"):
        want = json.loads((local / name).read_text())
        got = json.loads(storage.read_text(storage.join(remote, name)))
        want.pop("backend", None), got.pop("backend", None)
        assert got == want, name
    want = json.loads((local / "reports" / "ingest.json").read_text())
    got = json.loads(storage.read_text(storage.join(remote, "reports", "ingest.json")))
    want.pop("seconds"), got.pop("seconds")
    assert got == want


def test_stages_at_s3_write_the_same_bytes_as_local(local_run, team_client_env, team_env):
    root, params = local_run
    prefix = f"s3://{team_client_env.s3_bucket}/lake-{uuid.uuid4().hex[:8]}"
    _stages(root / "data", prefix, params)
    keys = _keys(team_client_env, team_env, prefix)
    assert {
        "observations/observations.parquet",
        "observations/patients.parquet",
        "features/features.parquet",
        "quarantine/quarantine.parquet",
    } <= set(keys)
    local = root / "local"
    for name in ("observations/observations.parquet", "features/features.parquet"):
        with storage.open_file(storage.join(prefix, name)) as fh:
            assert fh.read() == (local / name).read_bytes(), f"{name} differs from the local run"
    _same_reports(local, prefix)


def _upload(local: Path, url: str) -> None:
    fs, inner = storage.filesystem(url)
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(f), f"{inner}/{f.relative_to(local).as_posix()}")


def test_raw_data_at_s3_is_ingested_and_named_by_its_url(local_run, team_client_env, capsys):
    root, params = local_run
    prefix = f"s3://{team_client_env.s3_bucket}/lake-{uuid.uuid4().hex[:8]}"
    raw = f"{prefix}/raw/data"
    _upload(root / "data", raw)
    _stages(raw, prefix, params)
    local = root / "local"
    with storage.open_file(storage.join(prefix, "observations", "observations.parquet")) as fh:
        assert fh.read() == (local / "observations" / "observations.parquet").read_bytes()
    got = json.loads(storage.read_text(storage.join(prefix, "reports", "ingest.json")))
    want = json.loads((local / "reports" / "ingest.json").read_text())
    here = str(root / "data")
    assert list(got["files"]) == [k.replace(here, raw) for k in want["files"]]
    assert all(k.startswith(raw + "/") for k in got["files"])
    assert list(got["files"].values()) == list(want["files"].values())
    q = storage.read_parquet(storage.join(prefix, "quarantine", "quarantine.parquet"))
    assert len(q) and q["file"].astype(str).str.startswith(raw + "/").all()
    rc = main(
        ["ingest", f"{prefix}/no-such-folder", "--out", str(root / "x"), "--params", str(params)]
    )
    assert rc == 2 and f"{prefix}/no-such-folder: input not found" in capsys.readouterr().err


def test_partitioned_observations_at_s3_give_the_local_features(
    local_run, team_client_env, team_env, tmp_path
):
    root, _ = local_run
    params = _params(tmp_path / "params.yaml", observations_layout="partitioned", patient_buckets=4)
    prefix = f"s3://{team_client_env.s3_bucket}/lake-{uuid.uuid4().hex[:8]}"
    _stages(root / "data", prefix, params)
    keys = _keys(team_client_env, team_env, prefix)
    parts = [k for k in keys if k.startswith("observations/observations.parquet/")]
    assert "observations/observations.parquet/_buckets" in parts
    assert [k for k in parts if k.endswith(".parquet")] == [
        f"observations/observations.parquet/patient_bucket={b:04d}/part-0.parquet" for b in range(4)
    ]
    obs_url = storage.join(prefix, "observations", "observations.parquet")
    local = root / "local"
    pd.testing.assert_frame_equal(
        _sorted_obs(storage.read_parquet(obs_url)),
        _sorted_obs(pd.read_parquet(local / "observations" / "observations.parquet")),
        check_exact=True,
        check_dtype=False,
        check_categorical=False,
    )
    # one bucket's folder holds exactly the patients the stable hash puts there
    one = storage.read_parquet(storage.bucket_dir(obs_url, 2))
    assert set(storage.patient_bucket(one["patient_id"].to_numpy(), 4)) == {2}
    pd.testing.assert_frame_equal(
        read_features(storage.join(prefix, "features", "features.parquet")),
        read_features(local / "features" / "features.parquet"),
        check_exact=True,
    )
    _same_reports(local, prefix)


def test_dask_workers_read_and_write_the_object_store(
    local_run, team_client_env, team_env, tmp_path, monkeypatch
):
    """The stack's scheduler and workers: each task reads its bucket from s3 and writes its
    part there; the client process never reads observations or builds feature rows."""
    import features.dask_backend as dask_backend

    root, _ = local_run
    params = _params(tmp_path / "params.yaml", observations_layout="partitioned", patient_buckets=3)
    prefix = f"s3://{team_client_env.s3_bucket}/lake-{uuid.uuid4().hex[:8]}"
    _stages(root / "data", prefix, params)  # local backend: the partitioned input at s3
    local_backend = read_features(storage.join(prefix, "features", "features.parquet"))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the client read observations / built feature rows")

    monkeypatch.setattr(dask_backend, "read_observations", forbidden)
    monkeypatch.setattr(dask_backend, "build_feature_matrix_with_report", forbidden)
    out = storage.join(prefix, "features-dask")
    args = ["--observations", str(storage.join(prefix, "observations")), "--out", str(out)]
    assert main(["features", *args, "--params", str(params), "--backend", "dask"]) == 0
    keys = _keys(team_client_env, team_env, prefix)
    assert [k for k in keys if k.startswith("features-dask/features.parquet/")] == [
        f"features-dask/features.parquet/part-{i:05d}.parquet" for i in range(3)
    ]
    remote = read_features(storage.join(out, "features.parquet"))
    pd.testing.assert_frame_equal(remote, local_backend, check_exact=True)
    pd.testing.assert_frame_equal(
        remote, read_features(root / "local" / "features" / "features.parquet"), check_exact=True
    )
    report = json.loads(storage.read_text(storage.join(out, "features_report.json")))
    want = json.loads((root / "local" / "features" / "features_report.json").read_text())
    assert report["backend"] == "dask"
    assert {k: report[k] for k in ("rows", "excluded", "by_setting", "n_features")} == {
        k: want[k] for k in ("rows", "excluded", "by_setting", "n_features")
    }

    # train.backend dask on the same cluster: the workers read the feature parts from s3
    import dask.dataframe as dd

    import features.io

    monkeypatch.setattr(dd, "from_pandas", forbidden)
    read_columns: list[object] = []
    read_frame = features.io.read_features

    def spy(path: object, columns: list[str] | None = None) -> pd.DataFrame:
        read_columns.append(columns)
        return read_frame(path, columns)  # type: ignore[arg-type]

    monkeypatch.setattr(features.io, "read_features", spy)
    train = tmp_path / "train.yaml"
    conf = yaml.safe_load(params.read_text())
    conf["train"].update(n_estimators=30, cv_folds=0, compiled_trees="none", experiment="lake")
    train.write_text(yaml.safe_dump(conf, sort_keys=False))
    obs = storage.join(prefix, "observations")
    rc = main(
        [
            "train",
            "--features",
            str(storage.join(out, "features.parquet")),
            "--dictionary",
            str(storage.join(out, "feature_dictionary.json")),
            "--patients",
            str(storage.join(obs, "patients.parquet")),
            "--out",
            str(tmp_path / "model"),
            "--params",
            str(train),
            "--backend",
            "dask",
        ]
    )
    assert rc == 0
    run = json.loads((tmp_path / "model" / "run.json").read_text())
    assert run["best_iteration"] == 30 and run["backend"] == "dask"
    assert len(run["feature_names"]) > 300 and run["val"]["val_auroc"] is not None
    # this process read the row keys only; the workers scored every row from s3
    assert read_columns and all(c is not None and len(c) < 12 for c in read_columns)
    preds = pd.read_parquet(tmp_path / "model" / "predictions.parquet")
    meta = run["metadata"]
    n_rows = meta["n_train_rows"] + meta["n_val_rows"] + meta["n_test_rows"]
    assert 0 < len(preds) == n_rows <= len(remote) and preds["raw_score"].notna().all()


def test_unreachable_store_is_a_message_naming_the_url(local_run, tmp_path, monkeypatch, capsys):
    _, params = local_run
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    url = "s3://nowhere-bucket/obs"
    rc = main(
        ["features", "--observations", url, "--out", str(tmp_path / "f"), "--params", str(params)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and url in err and "Traceback" not in err


def test_service_landing_area_at_s3_is_shared_and_ingested(team_client_env, tmp_path, monkeypatch):
    """``VITALRISK_LANDING_DIR=s3://…``: what one replica lands, another reads (its patient
    pages) and ``vitalrisk ingest`` takes from the URL; a store that does not answer is the
    service's 503 (LogUnavailable), never a 500."""
    from governance.pseudonym import get_key, pseudonymise
    from serving.config import ServeConfig
    from serving.landing import read_landing, write_landing
    from serving.predlog import LogUnavailable

    ps_a, ps_b, ps_c = (pseudonymise(f"MRN-{x}", get_key()) for x in "abc")
    url = f"s3://{team_client_env.s3_bucket}/landing-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("VITALRISK_LANDING_DIR", url)
    where = ServeConfig().landing_path()
    assert where == url

    def rows(ps: str, hr: float) -> list[dict[str, str]]:
        return [
            {
                "patient_id": ps,
                "time": f"2026-01-01T0{h}:00:00Z",
                "code": "heart_rate",
                "value": repr(hr + h),
                "unit": "/min",
                "source": "api",
            }
            for h in range(3)
        ]

    assert read_landing(where) == []  # nothing landed yet: no error
    a = write_landing(rows(ps_a, 70.0), where, "req-replica-1")  # replica 1
    b = write_landing(rows(ps_b, 90.0), where, "req-replica-2")  # replica 2
    assert a != b and a.startswith("api-") and a.endswith(".csv")
    assert [storage.name(u) for u in storage.list_files(url, ".csv")] == sorted([a, b])
    # a fresh process (another replica) reads both from the store
    import serving.landing as landing

    landing._READ_CACHE.clear()
    got = read_landing(where)
    assert sorted(got) == sorted(
        [
            (p, f"2026-01-01T0{h}:00:00Z", "heart_rate", v + h)
            for p, v in ((ps_a, 70.0), (ps_b, 90.0))
            for h in range(3)
        ]
    )
    assert {r[0] for r in read_landing(where, {ps_b})} == {ps_b}
    # ingest takes the landing area by its URL (no consent table here: include them)
    out = tmp_path / "obs"
    params = tmp_path / "params.yaml"
    conf = yaml.safe_load(Path("params.yaml").read_text())
    conf["ingest"]["missing_consent"] = "include"
    params.write_text(yaml.safe_dump(conf, sort_keys=False))
    rc = main(
        [
            "ingest",
            url,
            "--out",
            str(out),
            "--quarantine",
            str(tmp_path / "q"),
            "--report",
            str(tmp_path / "ingest.json"),
            "--params",
            str(params),
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "ingest.json").read_text())
    assert sorted({f for f in json.dumps(report).split('"') if f.startswith(url)}) == sorted(
        storage.join(url, n) for n in (a, b)
    )
    obs = pd.read_parquet(out / "observations.parquet")
    assert len(obs) == 6 and set(obs["patient_id"]) == {ps_a, ps_b}

    # the store stops answering: writes and reads are LogUnavailable (a 503), naming the area
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(LogUnavailable, match="landing"):
        write_landing(rows(ps_c, 60.0), where, "req-replica-1")
    with pytest.raises(LogUnavailable, match=url):
        read_landing(where)
