"""Damaged prediction logs are refused with one line (exit 2), read-only, before the monitor
writes anything: empty, truncated, garbage, garbage over part of a valid log, wrong schema."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from core.errors import UserError
from core.schema import OUTCOMES_DDL, PREDICTIONS_DDL
from monitoring.log_check import check_log


def _valid(path: Path, rows: int = 400) -> Path:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(PREDICTIONS_DDL)
    con.execute(OUTCOMES_DDL)
    feats = json.dumps({f"f{i}": i / 7 for i in range(60)})
    con.executemany(
        "INSERT INTO predictions (request_id, scored_at, patient_id, model_name, model_version, role, "
        "probability, news2_total, features) VALUES (?,?,?,?,?,?,?,?,?)",
        [
            (
                f"r{i}",
                "2026-01-01T00:00:00Z",
                "p_" + "0" * 20,
                "m",
                "1",
                "champion",
                0.1,
                1.0,
                feats,
            )
            for i in range(rows)
        ],
    )
    con.commit()
    con.close()  # checkpoints the WAL into the file and removes the sidecars
    return path


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _truncated(p: Path) -> None:
    _valid(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _truncated_mid_page(p: Path) -> None:
    _valid(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])


def _garbage(p: Path) -> None:
    p.write_bytes(os.urandom(50_000))


def _text(p: Path) -> None:
    p.write_text("request_id,scored_at\nr1,2026-01-01\n")


def _garbage_inside(p: Path) -> None:
    _valid(p)
    data = bytearray(p.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[3 * page : 6 * page] = os.urandom(3 * page)  # b-tree pages of the table
    p.write_bytes(bytes(data))


def _no_predictions_table(p: Path) -> None:
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE scores (x)")
    con.commit()
    con.close()


def _wrong_columns(p: Path) -> None:
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE predictions (request_id TEXT, probability REAL, features TEXT)")
    con.commit()
    con.close()


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("empty", _empty, "empty file"),
    ("truncated", _truncated, "truncated"),
    ("truncated-mid-page", _truncated_mid_page, "truncated"),
    ("garbage", _garbage, "not an SQLite database"),
    ("csv", _text, "not an SQLite database"),
    ("garbage-inside", _garbage_inside, "damaged database"),
    ("no-table", _no_predictions_table, "no table 'predictions'"),
    ("wrong-columns", _wrong_columns, "table 'predictions' has columns"),
]


@pytest.mark.parametrize(("name", "make", "needle"), CASES, ids=[c[0] for c in CASES])
def test_damaged_logs_are_refused_read_only(
    tmp_path: Path, name: str, make: Callable[[Path], None], needle: str
) -> None:
    log = tmp_path / "predictions.sqlite"
    make(log)
    before = hashlib.sha256(log.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=needle) as exc:
        check_log(log)
    msg = str(exc.value)
    assert msg.startswith(f"{log}: ") and "\n" not in msg
    assert hashlib.sha256(log.read_bytes()).hexdigest() == before  # not written to
    assert sorted(os.listdir(tmp_path)) == ["predictions.sqlite"]  # no -wal/-shm created


def test_an_intact_log_passes_even_while_a_writer_has_it_open(tmp_path: Path) -> None:
    log = _valid(tmp_path / "predictions.sqlite")
    check_log(log)
    assert sorted(os.listdir(tmp_path)) == ["predictions.sqlite"]
    writer = sqlite3.connect(log)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("INSERT INTO predictions (request_id) VALUES ('live')")
    writer.commit()  # the row is in the -wal file only
    try:
        check_log(log)
    finally:
        writer.close()


def test_monitor_cli_stops_with_one_line_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.cli import main

    log = tmp_path / "predictions.sqlite"
    _garbage_inside(log)
    outcomes = tmp_path / "outcomes.csv"
    outcomes.write_text("request_id,label\nr1,1\n")
    before = log.read_bytes()
    code = main(
        [
            "monitor",
            "--log",
            str(log),
            "--outcomes",
            str(outcomes),
            "--out",
            str(tmp_path / "reports"),
            "--no-workspace",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "damaged database" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert log.read_bytes() == before and not (tmp_path / "reports").exists()
