"""Reading the serving log: windows, chunks, missing features, timestamp spellings."""

import json
import sqlite3

import numpy as np
import pandas as pd

from monitoring import prediction_log as plog


def _frame(n, start="2026-11-01", hours=48.0, role="champion"):
    t = pd.Timestamp(start, tz="UTC") + pd.to_timedelta(np.linspace(0, hours * 3600, n), unit="s")
    return pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "scored_at": t,
            "patient_id": [f"p_{i:020x}" for i in range(n)],
            "model_name": "m",
            "model_version": "1",
            "role": role,
            "probability": np.linspace(0, 1, n),
            "news2_total": 3.0,
            "features": [{"hr_mean": float(i), "setting": "ward"} for i in range(n)],
        }
    )


def test_window_is_the_last_days_before_the_latest(tmp_path):
    log = tmp_path / "p.sqlite"
    plog.write_predictions(log, _frame(97, hours=96.0))  # one row per hour over 4 days
    plog.write_predictions(log, _frame(5, start="2026-11-10", role="shadow"))
    w = plog.find_window(log, days=1.0, role="champion")
    assert w.end == pd.Timestamp("2026-11-05", tz="UTC")
    assert w.rows == 25  # hours 72..96 inclusive; shadow rows not counted


def test_chunks_cover_the_window_once_with_parsed_features(tmp_path):
    log = tmp_path / "p.sqlite"
    plog.write_predictions(log, _frame(50))
    w = plog.find_window(log, days=30, role="champion")
    schema = {"hr_mean": "float", "setting": "str", "spo2_last": "float"}
    chunks = list(plog.iter_window(log, w, "champion", schema, chunk_rows=7))
    assert [len(c) for c in chunks] == [7] * 7 + [1]
    df = pd.concat(chunks, ignore_index=True)
    assert df["request_id"].tolist() == [f"r{i}" for i in range(50)]
    assert df["hr_mean"].tolist() == [float(i) for i in range(50)]
    assert df["spo2_last"].isna().all()  # not logged -> missing, not an error
    assert (df["setting"] == "ward").all()
    assert str(df["scored_at"].dt.tz) == "UTC"


def test_z_suffix_and_null_features_from_other_writers(tmp_path):
    log = tmp_path / "p.sqlite"
    plog.ensure_tables(log)
    with sqlite3.connect(log) as con:
        con.executemany(
            # an older writer: the first nine columns only (no setting / horizon)
            "INSERT INTO predictions (request_id, scored_at, patient_id, model_name, "
            "model_version, role, probability, news2_total, features) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            [
                (
                    "a",
                    "2026-11-01T10:00:00Z",
                    "p_x",
                    "m",
                    "1",
                    "champion",
                    0.1,
                    2.0,
                    json.dumps({"hr_mean": None}),
                ),
                ("b", "2026-11-01T11:00:00.5+00:00", "p_y", "m", "1", "champion", 0.2, None, None),
            ],
        )
    w = plog.find_window(log, days=1, role="champion")
    assert w.rows == 2
    df = pd.concat(
        plog.iter_window(log, w, "champion", {"hr_mean": "float", "news2_total": "float"}, 10)
    )
    assert df["hr_mean"].isna().all()
    assert df["news2_total"].tolist()[0] == 2.0  # falls back to the log column


def test_labelled_join_uses_request_and_patient(tmp_path):
    log = tmp_path / "p.sqlite"
    plog.write_predictions(log, _frame(4))
    plog.write_outcomes(
        log,
        pd.DataFrame(
            {
                "request_id": ["r0", "r1", "r2"],
                "patient_id": [f"p_{0:020x}", f"p_{1:020x}", "p_wrongpatient000000000"],
                "label": [1, 0, 1],
            }
        ),
    )
    w = plog.find_window(log, days=30, role="champion")
    lab = plog.read_labelled(log, w, "champion")
    assert sorted(lab["request_id"]) == ["r0", "r1"]  # r2's patient does not match
