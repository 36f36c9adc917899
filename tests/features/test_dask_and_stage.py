"""The Dask backend matches the local backend; the ``vitalrisk features`` stage end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import features.streaming as streaming
from features.build import build_feature_matrix
from features.config import DaskConfig
from features.dask_backend import partition_patients
from features.stage import run_local
from pipelines.cli import main

from .conftest import make_cohort


@pytest.fixture(scope="module")
def obs_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("observations")
    obs, pats, outs = make_cohort(n_patients=16, days=9, seed=11)
    obs.to_parquet(d / "observations.parquet", index=False, row_group_size=2000)
    pats.to_parquet(d / "patients.parquet", index=False)
    outs.to_parquet(d / "outcomes.parquet", index=False)
    return d


def test_partitions_cover_patients_once():
    parts = partition_patients(["p_c", "p_a", "p_b", "p_a"], 2)
    assert parts == [["p_a", "p_b"], ["p_c"]]


@pytest.fixture(scope="module")
def local_cluster():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.mark.parametrize("layout", ["file", "partitioned"])
def test_dask_local_cluster_equals_local(obs_dir, tmp_path, config, vocab, local_cluster, layout):
    """Workers read their partitions and write part files; the client gathers metadata only."""
    from core import storage
    from features.dask_backend import run_dask
    from features.io import read_features

    obs = pd.read_parquet(obs_dir / "observations.parquet")
    pats = pd.read_parquet(obs_dir / "patients.parquet")
    outs = pd.read_parquet(obs_dir / "outcomes.parquet")
    local = build_feature_matrix(obs, pats, outs, config, vocab)
    src = obs_dir
    if layout == "partitioned":
        src = tmp_path / "in"
        src.mkdir()
        for name in ("patients", "outcomes"):
            (src / f"{name}.parquet").write_bytes((obs_dir / f"{name}.parquet").read_bytes())
        written = storage.write_bucketed(obs, src / "observations.parquet", 5)
        assert len(written) > 1
    cfg = config.model_copy(update={"backend": "dask", "dask": DaskConfig(n_partitions=3)})
    summary = run_dask(src, tmp_path / "out", cfg, vocab, client=local_cluster)
    parts = sorted((tmp_path / "out" / "features.parquet").glob("part-*.parquet"))
    assert len(parts) == (3 if layout == "file" else len(written))
    remote = read_features(tmp_path / "out" / "features.parquet")
    pd.testing.assert_frame_equal(remote, local, check_exact=True)
    assert summary["excluded"] == local.attrs["excluded"] and summary["rows"] == len(local)
    report = json.loads((tmp_path / "out" / "features_report.json").read_text())
    assert report["by_setting"] == summary["by_setting"]


def _params(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "params.yaml"
    p.write_text("features:\n  backend: local\n  lookback_hours: 168\n" + extra)
    return p


def test_stage_cli_writes_features_dictionary_and_report(obs_dir, tmp_path, capsys):
    out = tmp_path / "features"
    rc = main(
        [
            "features",
            "--observations",
            str(obs_dir),
            "--out",
            str(out),
            "--params",
            str(_params(tmp_path)),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "prevalence" in printed and "partial_horizon" in printed
    f = pd.read_parquet(out / "features.parquet")
    doc = json.loads((out / "feature_dictionary.json").read_text())
    assert [x["name"] for x in doc["features"]] == list(f.columns[4:])
    assert str(f["time"].dtype) == "datetime64[ns, UTC]"
    rep = json.loads((out / "features_report.json").read_text())
    assert rep["rows"] == len(f) and set(rep["by_setting"]) == {"ward", "home"}


def test_stage_cli_user_errors(obs_dir, tmp_path, capsys):
    def run(observations, params) -> int:
        args = ["--observations", str(observations), "--out", str(tmp_path / "o")]
        return main(["features", *args, "--params", str(params)])

    rc = run(obs_dir, _params(tmp_path, "  windows:\n    hourz: {}\n"))
    err = capsys.readouterr().err
    assert rc == 2 and "features.windows.hourz" in err and "unknown key" in err
    rc = run(tmp_path / "nowhere", _params(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and "observations.parquet" in err
    short = _params(tmp_path).read_text().replace("lookback_hours: 168", "lookback_hours: 10")
    (tmp_path / "short.yaml").write_text(short)
    rc = run(obs_dir, tmp_path / "short.yaml")
    assert rc == 2 and "lookback_hours" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["sorted", "shuffled", "unknown_patients"])
def test_streamed_stage_equals_the_in_memory_build(
    obs_dir, tmp_path, config, vocab, monkeypatch, layout
):
    """Small batches and row groups: patients span batches; a file not grouped by
    patient falls back to reading it whole; rows of patients nobody predicts for are ignored."""
    obs = pd.read_parquet(obs_dir / "observations.parquet")
    pats = pd.read_parquet(obs_dir / "patients.parquet")
    outs = pd.read_parquet(obs_dir / "outcomes.parquet")
    want = build_feature_matrix(obs, pats, outs, config, vocab)
    src = tmp_path / "in"
    src.mkdir()
    if layout == "shuffled":
        obs = obs.sample(frac=1.0, random_state=0)
    if layout == "unknown_patients":
        stray = obs.iloc[:300].assign(patient_id="p_zz_not_in_the_patient_table")
        obs = pd.concat([obs, stray]).sort_values(["patient_id", "time"], kind="stable")
    obs.to_parquet(src / "observations.parquet", index=False, row_group_size=1500)
    pats.to_parquet(src / "patients.parquet", index=False)
    outs.to_parquet(src / "outcomes.parquet", index=False)
    monkeypatch.setattr(streaming, "BATCH_ROWS", 1000)
    monkeypatch.setattr(streaming, "ROW_GROUP_ROWS", 50)  # several chunks per row group
    streamed = []
    real = streaming.stream_features

    def counting(*args, **kwargs):
        streamed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("features.stage.stream_features", counting)
    summary = run_local(src, tmp_path / "out", config.model_copy(update={"threads": 2}), vocab)
    got = pd.read_parquet(tmp_path / "out" / "features.parquet")
    pd.testing.assert_frame_equal(got, want.reset_index(drop=True), check_exact=True)
    assert summary["rows"] == len(want) and streamed
    assert summary["excluded"] == want.attrs["excluded"]
    assert np.isclose(
        summary["by_setting"]["ward"]["prevalence"], want[want.setting == "ward"]["label"].mean()
    )
