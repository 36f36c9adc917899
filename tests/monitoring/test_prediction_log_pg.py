"""The monitor reads the replicas' PostgreSQL prediction log exactly as it reads the SQLite
file: the same frames written to both give the same windows, chunks, samples, sums, labels and
verdict (team mode; database ``test`` on 127.0.0.1:5432, a fresh schema per test)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from monitoring import prediction_log as plog
from monitoring import synthetic as syn
from pipelines.cli import main
from tests.monitoring.conftest import frame

PG_BASE = os.environ.get("VITALRISK_TEST_PG_URL") or "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_log() -> Iterator[str]:
    from ops import procs
    from ops.settings import host_port

    if not procs.port_open(*host_port(PG_BASE, 5432)):
        pytest.skip(f"{PG_BASE} does not answer")
    import psycopg

    schema = f"monitor_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{PG_BASE}?schema={schema}"
    finally:
        with psycopg.connect(PG_BASE, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _both(tmp_path: Path, pg_log: str, data: pd.DataFrame) -> tuple[Path, str]:
    log = tmp_path / "p.sqlite"
    for target in (log, pg_log):
        plog.write_predictions(target, data)
    return log, pg_log


def test_every_reader_agrees_on_sqlite_and_postgresql(tmp_path: Path, pg_log: str) -> None:
    cur = frame(600, seed=5)
    cur["label"] = cur["label"].astype(int)
    data = syn.prediction_log_frame(cur, "2026-11-01", seed=5)
    log, db = _both(tmp_path, pg_log, data)
    assert plog.log_exists(db) and not plog.log_exists(pg_log.replace("monitor_", "absent_"))
    from monitoring.log_check import check_log

    check_log(db)  # the contract's columns (plus the explicit rowid)
    w_file, w_db = (plog.find_window(x, 2.0, "champion") for x in (log, db))
    assert w_file == w_db and w_db.rows > 0
    schema = {"heart_rate_mean_4h": "float", "setting": "str"}

    def chunks(x: str | Path) -> pd.DataFrame:
        return pd.concat(plog.iter_window(x, w_file, "champion", schema, 97), ignore_index=True)

    pd.testing.assert_frame_equal(chunks(log), chunks(db))

    def sample(x: str | Path, by_patient: bool) -> pd.DataFrame:
        parts = plog.sample_window(x, w_file, "champion", schema, 150, 7, 64, by_patient)
        return pd.concat(parts, ignore_index=True)

    for by_patient in (False, True):
        pd.testing.assert_frame_equal(sample(log, by_patient), sample(db, by_patient))
    total_f, n_f = plog.window_risk(log, w_file, "champion")
    total_d, n_d = plog.window_risk(db, w_file, "champion")
    assert n_f == n_d and total_d == pytest.approx(total_f, rel=1e-12)
    assert plog.logged_feature_names(log, "champion") == plog.logged_feature_names(db, "champion")
    ids = data["request_id"].tolist()[:40]
    pd.testing.assert_frame_equal(
        plog.read_predictions_for(log, request_ids=ids)
        .sort_values("request_id")
        .reset_index(drop=True),
        plog.read_predictions_for(db, request_ids=ids)
        .sort_values("request_id")
        .reset_index(drop=True),
        check_dtype=False,
    )
    outcomes = pd.DataFrame(
        {
            "request_id": ids,
            "patient_id": data["patient_id"][:40],
            "label": [i % 2 for i in range(40)],
        }
    )
    for x in (log, db):
        plog.write_outcomes(x, outcomes)
    lab_f, lab_d = (plog.read_labelled(x, w_file, "champion") for x in (log, db))
    key = ["request_id"]
    pd.testing.assert_frame_equal(
        lab_f.drop(columns="received_at").sort_values(key).reset_index(drop=True),
        lab_d.drop(columns="received_at").sort_values(key).reset_index(drop=True),
        check_dtype=False,
    )


def test_monitor_cli_on_the_database_log(
    tmp_path: Path, pg_log: str, reference: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vitalrisk monitor`` finds the replicas' log from ``VITALRISK_SERVE_DB_URL`` and gives
    the verdict the same rows give from a file; a database without the log is exit 2."""
    feats = tmp_path / "features.parquet"
    reference.drop(columns=["probability"]).to_parquet(feats)
    params = tmp_path / "params.yaml"
    params.write_text(
        "monitor:\n  reference_size: 4000\n  current_size: 2000\n  project: t\n"
        "  performance: {min_labelled: 100}\n"
    )
    data = syn.prediction_log_frame(frame(2000, seed=21, drift="hr_offset"), "2026-11-01", 21)
    log, db = _both(tmp_path, pg_log, data)

    def run(out: str, *log_args: str) -> tuple[int, dict]:
        argv = [
            "monitor",
            "--features",
            str(feats),
            "--params",
            str(params),
            "--out",
            str(tmp_path / out),
            "--no-workspace",
            "--reference-model",
            "none",
            *log_args,
        ]
        code = main(argv)
        return code, json.loads((tmp_path / out / "summary.json").read_text())

    code_f, s_f = run("file", "--log", str(log))
    monkeypatch.setenv("VITALRISK_SERVE_DB_URL", db)
    monkeypatch.delenv("VITALRISK_PREDICTION_LOG", raising=False)
    code_d, s_d = run("db")
    assert code_d == code_f and code_d in {10, 20}
    assert s_d["verdict"] == s_f["verdict"]
    assert s_d["drifted_features"] == s_f["drifted_features"]
    empty = pg_log.replace("monitor_", "nolog_")
    assert (
        main(
            [
                "monitor",
                "--features",
                str(feats),
                "--params",
                str(params),
                "--log",
                empty,
                "--out",
                str(tmp_path / "x"),
                "--no-workspace",
                "--reference-model",
                "none",
            ]
        )
        == 2
    )


def test_postgresql_ddl_has_the_contract_columns_in_order() -> None:
    """core/pg.py's DDL and core/schema.py's column list cannot drift apart."""
    import re

    from core.pg import PREDICTIONS_PG_DDL
    from core.schema import OUTCOME_LOG_COLUMNS, PREDICTION_LOG_COLUMNS

    tables = dict(
        re.findall(r"CREATE TABLE IF NOT EXISTS (\w+) \(([^;]*?)\n\)", PREDICTIONS_PG_DDL)
    )
    cols = {
        t: [c.split()[0] for c in body.replace("\n", " ").split(",")] for t, body in tables.items()
    }
    assert cols["predictions"] == ["rowid", *PREDICTION_LOG_COLUMNS]
    assert cols["outcomes"] == list(OUTCOME_LOG_COLUMNS)
