"""Serving pieces in-process: keys, rate limits, prediction log, fast matrix path, config."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.thresholds import Thresholds, band_of
from serving.auth import (
    AuthConfigError,
    KeyStore,
    RateLimiter,
    bearer_token,
    hash_secret,
    parse_key_spec,
)
from serving.config import load_serve_config
from serving.predlog import PredictionLog, PredictionRecord


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    f = tmp_path / "keys.txt"
    f.write_text(f"# comment\nhub:ingest:sha256:{hash_secret('hub-secret-0001x')}\n\n")
    store = KeyStore.from_env(
        {
            "VITALRISK_API_KEYS": "app:score+read:app-secret-0001x",
            "VITALRISK_API_KEYS_FILE": str(f),
        }
    )
    app = store.authenticate("app-secret-0001x")
    hub = store.authenticate("hub-secret-0001x")
    assert (
        app is not None and app.name == "app" and app.allows("score") and not app.allows("ingest")
    )
    assert (
        hub is not None and hub.name == "hub" and hub.allows("ingest") and not hub.allows("score")
    )
    assert store.authenticate("app-secret-0002x") is None
    # only digests are kept
    assert all(
        k.digest == hashlib.sha256(s.encode()).digest()
        for k, s in [(app, "app-secret-0001x"), (hub, "hub-secret-0001x")]
    )
    assert "app-secret-0001x" not in repr(store)


STRONG = "k7Qp-2mZx-9LwR-4tVb"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nocolons", "NAME:SCOPES:SECRET"),
        (f"a:write:{STRONG}", "scope"),
        (f"a::{STRONG}", "NAME:SCOPES:SECRET"),
        ("a:score:short-secret", "weak"),  # 12 characters
        ("a:score:aaaaaaaaaaaaaaaaaaaa", "weak"),  # long, but 1 different character
        ("a:score:0123456789abcde", "weak"),  # 15 characters
        ("a:score:sha256:xyz", "64 hex"),
        (f"a:score+rate=0:{STRONG}", "rate="),
        (f"a:score+rate=inf:{STRONG}", "rate="),
        (f"ward app:score:{STRONG}", "key name"),  # a space (names go into logs)
        (f"a\nb:score:{STRONG}", "key name"),
    ],
)
def test_bad_key_specs(spec: str, needle: str) -> None:
    with pytest.raises(AuthConfigError, match=needle):
        parse_key_spec(spec)


def test_key_config_errors_name_the_entry_not_the_secret() -> None:
    with pytest.raises(AuthConfigError) as exc:
        KeyStore.from_env({"VITALRISK_API_KEYS": f"a:*:{STRONG},b:score:tiny-secret"})
    assert str(exc.value).startswith("VITALRISK_API_KEYS entry 2: key 'b'")
    assert "tiny-secret" not in str(exc.value) and "\n" not in str(exc.value)


def test_duplicate_key_names() -> None:
    with pytest.raises(AuthConfigError, match="unique; 'a' is also VITALRISK_API_KEYS entry 1"):
        KeyStore.from_env({"VITALRISK_API_KEYS": f"a:*:{STRONG},a:*:{STRONG}-2"})


def test_one_secret_for_two_keys_is_refused(tmp_path: Path) -> None:
    """Which scopes a request had would depend on which entry matched first."""
    f = tmp_path / "keys.txt"
    f.write_text(f"reader:read:sha256:{hash_secret(STRONG)}\n")
    with pytest.raises(AuthConfigError, match="'reader' has the same secret as key 'admin'"):
        KeyStore.from_env(
            {"VITALRISK_API_KEYS": f"admin:*:{STRONG}", "VITALRISK_API_KEYS_FILE": str(f)}
        )


def test_placeholder_secrets_refused_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = "ward:score:change-me-ward-0001"
    assert parse_key_spec(spec).name == "ward"  # fine for the demo
    monkeypatch.setenv("VITALRISK_MODE", "production")
    with pytest.raises(AuthConfigError, match="placeholder"):
        parse_key_spec(spec)


def test_production_mode_needs_its_keys() -> None:
    from serving.config import check_secrets

    prod = {"VITALRISK_MODE": "production"}
    good_p, good_a = (
        "p" + "0123456789abcdefghijklmnopqrstuvw",
        "a" + "zyxwvutsrqponmlkjihgfedcba987654",
    )
    check_secrets({})  # outside production mode nothing is required
    import os as _os

    old = _os.environ.get("VITALRISK_MODE")
    _os.environ["VITALRISK_MODE"] = "production"
    try:
        cases = [
            ({}, "VITALRISK_PSEUDONYM_KEY is not set"),
            ({"VITALRISK_PSEUDONYM_KEY": good_p}, "VITALRISK_AUDIT_KEY is not set"),
            (
                {"VITALRISK_PSEUDONYM_KEY": "short-key", "VITALRISK_AUDIT_KEY": good_a},
                "VITALRISK_PSEUDONYM_KEY is weak",
            ),
            (
                {"VITALRISK_PSEUDONYM_KEY": good_p, "VITALRISK_AUDIT_KEY": good_p},
                "must be different",
            ),
        ]
        for env, needle in cases:
            with pytest.raises(ValueError, match=needle):
                check_secrets({**prod, **env})
        check_secrets({**prod, "VITALRISK_PSEUDONYM_KEY": good_p, "VITALRISK_AUDIT_KEY": good_a})
    finally:
        if old is None:
            _os.environ.pop("VITALRISK_MODE", None)
        else:
            _os.environ["VITALRISK_MODE"] = old


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_token_bucket() -> None:
    lim = RateLimiter(rate=2.0, burst=3)
    assert [lim.acquire("k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.acquire("k", now=0.0) == pytest.approx(0.5)
    assert lim.acquire("other", now=0.0) == 0.0  # buckets are per key
    assert lim.acquire("k", now=0.6) == 0.0  # refilled
    assert lim.acquire("fast", now=0.0, rate=100.0) == 0.0


def _hammer(path: str, n: int) -> int:
    from serving.auth import SharedRateLimiter

    lim = SharedRateLimiter(rate=0.001, burst=25, path=path)
    return sum(lim.acquire("k", now=1000.0) == 0.0 for _ in range(n))


def test_shared_token_bucket_is_one_limit_across_processes(tmp_path: Path) -> None:
    """Worker processes draw from one bucket per key: the burst is granted once, not per worker."""
    import multiprocessing as mp

    from serving.auth import SharedRateLimiter

    path = tmp_path / "rate_limits.sqlite"
    a = SharedRateLimiter(rate=2.0, burst=3, path=path)
    b = SharedRateLimiter(rate=2.0, burst=3, path=path)
    assert [a.acquire("k", now=0.0), b.acquire("k", now=0.0), a.acquire("k", now=0.0)] == [0.0] * 3
    assert b.acquire("k", now=0.0) == pytest.approx(0.5)
    assert a.acquire("k", now=0.6) == 0.0  # refilled, whoever asks
    a.close()
    b.close()
    with mp.get_context("spawn").Pool(2) as pool:
        granted = pool.starmap(_hammer, [(str(tmp_path / "shared.sqlite"), 40)] * 2)
    assert sum(granted) == 25, granted  # 80 requests at one instant: exactly the burst


def test_bands_come_from_the_model_not_params(tmp_path: Path) -> None:
    t = Thresholds(low=0.1, high=0.3, alert_budget_per_100=10, watch_budget_per_100=30, unit="x")
    assert [band_of(p, t) for p in (0.05, 0.1, 0.29, 0.3)] == ["low", "medium", "medium", "high"]
    p = tmp_path / "params.yaml"
    # the old fixed bands are refused by name: thresholds are the model's
    p.write_text("serve:\n  risk_bands: {low: 0.1, high: 0.3}\n")
    with pytest.raises(ValueError, match=r"serve\.risk_bands: unknown key"):
        load_serve_config(p)
    p.write_text("serve:\n  data_sufficiency: {min_recent_vitals: 9}\n")
    with pytest.raises(ValueError, match="min_recent_vitals"):
        load_serve_config(p)
    assert load_serve_config(tmp_path / "missing.yaml").port == 3000


def _rec(i: int, role: str = "champion") -> PredictionRecord:
    return PredictionRecord(
        f"r{i}",
        "2026-01-01T00:00:00Z",
        "p_" + "0" * 20,
        "m",
        "1",
        role,
        0.5,
        None,
        {"a": float("nan"), "b": 1.0},
    )


def test_prediction_log_is_all_or_nothing(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "p.sqlite")
    assert log.append([_rec(1), _rec(1, "shadow")]) == 2

    class Boom(PredictionRecord):
        def row(self) -> tuple:  # type: ignore[override]
            return (*super().row()[:-1], object())  # not bindable -> the insert fails mid-request

    bad = Boom(*[getattr(_rec(2), f) for f in _rec(2).__dataclass_fields__])
    with pytest.raises(sqlite3.Error):
        log.append([_rec(2), bad])
    assert log.count() == 2  # the good row of the failed request was rolled back too
    con = sqlite3.connect(tmp_path / "p.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert (
        PredictionLog(tmp_path / "n.sqlite", "NORMAL")
        ._conn.execute("PRAGMA synchronous")
        .fetchone()[0]
        == 1
    )
    with pytest.raises(ValueError, match="FULL"):
        PredictionLog(tmp_path / "x.sqlite", "OFF")
    text = con.execute("SELECT features FROM predictions LIMIT 1").fetchone()[0]
    assert json.loads(text) == {"a": None, "b": 1.0}


def test_prediction_log_that_cannot_write_says_unavailable(tmp_path: Path) -> None:
    """A log whose table is gone or whose disk refuses (here: the table dropped by another
    connection) raises ``LogUnavailable`` (the service's 503), and reads still work."""
    from serving.predlog import LogUnavailable

    log = PredictionLog(tmp_path / "p.sqlite")
    assert log.append([_rec(1)]) == 1
    assert log.read("SELECT request_id FROM predictions WHERE role = ?", ("champion",)) == [
        {"request_id": _rec(1).request_id}
    ]
    assert log.read("SELECT * FROM no_such_table") == []  # an older log: nothing yet
    other = sqlite3.connect(tmp_path / "p.sqlite")
    other.execute("DROP TABLE predictions")
    other.execute("DROP TABLE acknowledgements")
    other.commit()
    other.close()
    with pytest.raises(LogUnavailable, match="retry later"):
        log.append([_rec(2)])
    with pytest.raises(LogUnavailable):
        log.acknowledge("2026-01-01T00:00:00Z", "p", "k", "r")
    log.close()


def test_prediction_log_checkpoints_off_the_request_path(tmp_path: Path) -> None:
    """Commits never copy the WAL back (no autocheckpoint); the background thread does."""
    import time as _time

    from serving.predlog import features_json

    feats = features_json({f"f{i}": 1.0 + i / 7 for i in range(300)})
    log = PredictionLog(tmp_path / "p.sqlite", checkpoint_seconds=0.2)
    assert log._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    rec = _rec(1)
    for _ in range(300):  # ~2 MB of rows, below the default autocheckpoint of 1000 pages
        log.append(
            [PredictionRecord(*[getattr(rec, f) for f in rec.__dataclass_fields__][:-1], feats)]
        )
    deadline = _time.monotonic() + 10
    while (tmp_path / "p.sqlite").stat().st_size < 1_000_000 and _time.monotonic() < deadline:
        _time.sleep(0.1)
    assert (tmp_path / "p.sqlite").stat().st_size > 1_000_000  # the rows reached the database
    log.close()
    assert (
        sqlite3.connect(tmp_path / "p.sqlite")
        .execute("SELECT COUNT(*) FROM predictions")
        .fetchone()[0]
        == 300
    )


def test_fast_matrix_matches_risk_model(tmp_path: Path) -> None:
    """Serving's numpy path must give RiskModel.predict_proba's numbers (incl. categories)."""
    import lightgbm as lgb
    import pandas as pd

    from models.pyfunc import Calibrator, RiskModel
    from serving.scoring import LoadedModel

    rng = np.random.default_rng(0)
    X = pd.DataFrame(
        {
            "a": rng.normal(size=300),
            "b": rng.normal(size=300),
            "c": rng.integers(0, 3, 300).astype(float),
        }
    )
    X.loc[::7, "a"] = np.nan
    y = (X["b"] + (X["c"] == 2) + rng.normal(0, 0.5, 300) > 0.8).astype(int)
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_leaves": 7},
        lgb.Dataset(X, y, categorical_feature=["c"]),
        20,
    )
    model = RiskModel(
        booster=booster, feature_names=["a", "b", "c"], categories={"c": ["x", "y", "z"]}
    )
    model.calibrator = Calibrator("isotonic").fit(booster.predict(X, raw_score=True), y)
    frame = X.copy()
    frame["c"] = frame["c"].map({0.0: "x", 1.0: "y", 2.0: "z"})
    lm = LoadedModel("m", "1", "champion", None, model)
    rows = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        for r in frame.to_dict("records")
    ]
    np.testing.assert_allclose(
        lm.predict_matrix(lm.matrix(rows)), model.predict_proba(frame), rtol=1e-12
    )
    contrib = lm.contributions_matrix(lm.matrix(rows))
    np.testing.assert_allclose(contrib, model.contributions(frame), rtol=1e-9)
    assert contrib.shape == (300, 4)


def test_serve_fails_fast_without_champion_or_keys(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("vitalrisk"))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/empty.db",
        "VITALRISK_API_KEYS": f"a:*:{STRONG}",
    }
    env.pop("VITALRISK_API_KEYS_FILE", None)
    r = subprocess.run(
        [exe, "serve", "--port", "1", "--params", str(tmp_path / "none.yaml")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "no 'champion' alias" in r.stderr and "Traceback" not in r.stderr
    env["VITALRISK_API_KEYS"] = ""
    r = subprocess.run(
        [exe, "serve", "--params", str(tmp_path / "none.yaml")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "no API keys" in r.stderr


def test_service_stops_when_started_without_champion(tmp_path: Path) -> None:
    """Even past the CLI pre-check, the BentoML server stops instead of restarting forever."""
    exe = str(Path(sys.executable).with_name("vitalrisk"))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/empty.db",
        "VITALRISK_API_KEYS": f"a:*:{STRONG}",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    from tests.serving.conftest import free_port

    cmd = [
        exe,
        "serve",
        "--no-check",
        "--port",
        str(free_port()),
        "--params",
        str(tmp_path / "none.yaml"),
    ]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "no champion to serve" in r.stdout + r.stderr


def _item(actor: str, rid: str, status: int = 200, patients: tuple[str, ...] = ()) -> Any:
    from serving.auditq import AuditItem

    return AuditItem(actor, "predict", "POST /v1/score", status, rid, patients, "3", "10.0.0.1")


def test_audit_writer_group_commits_before_answering(tmp_path: Path) -> None:
    """Concurrent commits share fsyncs; each returns only once its entry is on disk, and a
    group is coalesced per key, route, model version and status."""
    import asyncio

    from governance.audit import AuditLog
    from serving.auditq import AuditWriter

    p1, p2 = "p_" + "1" * 20, "p_" + "2" * 20
    log = AuditLog(tmp_path / "audit.jsonl")
    writer = AuditWriter(log).start()

    async def burst() -> None:
        async def one(i: int) -> None:
            await writer.commit(_item("app", f"r{i}", 200 if i % 5 else 422, (p1, p2)[: i % 3]), 5)
            # durable means: already in the file when the await returns
            on_disk = log.path.read_text()
            assert f'"r{i}"' in on_disk

        await asyncio.gather(*(one(i) for i in range(200)))

    asyncio.run(burst())
    writer.close()
    entries = list(log.entries())
    assert log.verify().ok
    assert writer.groups < 200  # shared fsyncs, not one per request
    ids = [r for e in entries for r in e["details"]["request_ids"]]
    assert sorted(ids) == sorted(f"r{i}" for i in range(200))
    for e in entries:
        assert e["details"]["status"] in (200, 422) and e["details"]["clients"] == ["10.0.0.1"]
        want = 422 if all(int(r[1:]) % 5 == 0 for r in e["details"]["request_ids"]) else 200
        assert e["details"]["status"] == want
    assert {p for e in entries for p in e["patients"]} == {p1, p2}


def test_audit_writer_fails_closed_and_recovers(tmp_path: Path) -> None:
    """An unwritable log: the commit raises (the service answers 503), ``healthy`` turns
    False, and the writer's probe turns it back once the log is writable again."""
    import asyncio
    import shutil
    import time as _time

    from governance.audit import AuditLog
    from serving.auditq import AuditUnavailable, AuditWriter

    class Log(AuditLog):  # counts failed appends, so the test knows when r3 was tried
        failed = 0

        def append_many(self, records):  # type: ignore[no-untyped-def]
            try:
                return super().append_many(records)
            except Exception:
                Log.failed += 1
                raise

    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(Log(path), probe_seconds=0.05).start()
    asyncio.run(writer.commit(_item("app", "r1"), 5))
    path.rename(tmp_path / "moved.jsonl")
    path.mkdir()  # the log's name is now a directory: every append fails
    with pytest.raises(AuditUnavailable):
        asyncio.run(writer.commit(_item("app", "r2"), 5))
    assert not writer.healthy and "audit.jsonl" in writer.last_error
    writer.record(_item("(anonymous)", "r3", 401))  # queued, fails quietly while down
    deadline = _time.monotonic() + 5
    while Log.failed < 2 and _time.monotonic() < deadline:  # r2's group, then r3's
        _time.sleep(0.01)
    assert Log.failed == 2
    shutil.rmtree(path)
    (tmp_path / "moved.jsonl").rename(path)
    deadline = _time.monotonic() + 5
    while not writer.healthy and _time.monotonic() < deadline:
        _time.sleep(0.05)
    assert writer.healthy
    asyncio.run(writer.commit(_item("app", "r4"), 5))
    writer.close()
    ids = [r for e in AuditLog(path).entries() for r in e["details"]["request_ids"]]
    assert ids == ["r1", "r4"]  # r2 was never answered, so it is not in the trail


def test_audit_writer_refuses_to_start_on_an_unusable_log(tmp_path: Path) -> None:
    from governance.audit import AuditLog, AuditLogError
    from serving.auditq import AuditWriter

    path = tmp_path / "audit.jsonl"
    path.write_text("garbage without a valid entry\n")
    with pytest.raises(AuditLogError, match="not a valid audit entry"):
        AuditWriter(AuditLog(path)).start()


def test_a_model_without_fitted_thresholds_is_not_served() -> None:
    """Serving never falls back to constants: a model trained before thresholds were logged
    with it stops the start (or the swap) with one sentence saying what to do."""
    from types import SimpleNamespace

    from core.vocabulary import load_vocabulary
    from serving.runtime import StartupError, _model_set
    from serving.scoring import LoadedModel

    model = SimpleNamespace(feature_names=["age"], metadata={"threshold": 0.2}, categories={})
    champion = LoadedModel("vitalrisk-deterioration", "3", "champion", None, model)
    with pytest.raises(StartupError, match=r"version 3 carries no fitted risk thresholds.*retrain"):
        _model_set(champion, None, None, {}, load_vocabulary(), None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1, "a": 2}',
        b'{"rows": [{"features": {"age": 30, "age": 90}}]}',
        b'{"a": "x:y", "a": 1}',  # a colon inside a string makes up for the dropped key
        b'{"a": {"b": 1, "b": 2}}',
        b'[{"a": 1}, {"b": "\\u003a", "b": 2}]',
        # a wide dict (counted by its length only) holding a nested duplicate
        b'{"w": {' + b", ".join(b'"k%d": 1' % i for i in range(40)) + b', "n": {"x": 1, "x": 2}}}',
    ],
)
def test_parse_json_refuses_every_duplicate_key(body: bytes) -> None:
    from serving.guard import parse_json

    with pytest.raises(ValueError, match="duplicate key"):
        parse_json(body)


def test_parse_json_keeps_colons_in_strings_and_wide_rows() -> None:
    from serving.guard import parse_json

    wide = {f"f{i}": (None if i % 3 else float(i)) for i in range(400)}
    doc = {"rows": [{"patient_id": "MRN:1", "features": wide}], "t": "08:00:00"}
    assert parse_json(json.dumps(doc).encode()) == doc


@pytest.mark.parametrize(
    "row",
    [
        {"features": {"a": 1.5, "b": None, "c": 70, "setting": "ward"}},
        {"patient_id": "  MRN-1 ", "features": {"a": 10**20}},
        {"patient_id": "x", "features": {}, "request_id": "client"},
    ],
)
def test_fast_feature_rows_equal_pydantic_validation(row: dict[str, Any]) -> None:
    """The guard's rows built without validating again are what pydantic would make."""
    from serving.schemas import FeatureRow, feature_rows, feature_rows_fast

    fast = feature_rows_fast({"rows": [row]}, "rid-1")
    assert fast is not None
    slow = FeatureRow.model_validate(row).model_copy(update={"request_id": "rid-1"})
    assert [r.model_dump() for r in fast.rows] == [slow.model_dump()]
    got = [type(v) for v in fast.rows[0].features.values()]
    assert got == [type(v) for v in slow.features.values()]
    assert fast.text == ([0] if "setting" in row["features"] else [])
    assert feature_rows({"rows": [row]}, "rid-1") == fast
    # an id with spaces around it is stripped, as pydantic does
    pid = str(row.get("patient_id") or "p")
    padded = {"rows": [{**row, "patient_id": f" {pid} "}]}
    assert feature_rows(padded, "r").rows[0].patient_id == pid.strip()


def test_max_singles_equal_the_one_by_one_rule() -> None:
    from serving import safety
    from serving.runtime import _max_singles, _num

    rows: list[dict[str, Any]] = [
        {},
        {"news2_rr": 3.0, "news2_hr": None},
        {"news2_spo2": float("nan"), "news2_o2": 2.0, "news2_temp": float("inf")},
        {"news2_rr": 0.0},
        {"news2_rr": "2"},  # text: read as _num reads it
        {"news2_rr": "x", "news2_hr": 1.0},
    ]
    expected = [safety.max_single([_num(r.get(n)) for n in safety.NEWS2_PARTS]) for r in rows]
    assert _max_singles(rows) == expected
    assert _max_singles(rows[:4]) == expected[:4]


def test_histogram_observed_at_once_equals_one_by_one() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from serving.metrics import _observe_all

    values = [0.0, 0.01, 0.015, 0.3, 0.31, 0.99, 1.0, 0.5, 0.02, 0.75]
    samples = []
    for observe in ("one", "all"):
        h = Histogram(
            "h", "h", buckets=(0.01, 0.02, 0.05, 0.3, 0.5, 0.75, 1.0), registry=CollectorRegistry()
        )
        if observe == "one":
            for v in values:
                h.observe(v)
        else:
            _observe_all(h, values)
        samples.append(
            [
                (s.name, s.labels, round(s.value, 12))
                for s in h.collect()[0].samples
                if not s.name.endswith("_created")
            ]
        )
    assert samples[0] == samples[1]


def test_landing_area_that_cannot_take_a_file_is_unavailable_not_an_error(tmp_path):
    """A landing area that refuses the file (here a file where the folder should be; a full
    or read-only disk the same) is LogUnavailable, the service's 503 with Retry-After, and
    names the area, never a row's values; a good folder gets the file atomically."""
    from serving.landing import LANDING_COLUMNS, read_landing, write_landing
    from serving.predlog import LogUnavailable

    row = {
        "patient_id": "p_0123456789abcdef0123",
        "time": "2026-01-01T08:00:00Z",
        "code": "heart_rate",
        "value": "71.0",
        "unit": "/min",
        "source": "api",
    }
    blocked = tmp_path / "landing"
    blocked.write_text("not a folder")
    with pytest.raises(LogUnavailable, match=r"landing area .*landing cannot take the file") as err:
        write_landing([row], blocked, "req-1")
    assert "p_0123" not in str(err.value) and "71.0" not in str(err.value)
    good = tmp_path / "good"
    name = write_landing([row], good, "req-2")
    assert [p.name for p in good.iterdir()] == [name]  # no temp file left behind
    assert (good / name).read_text().splitlines()[0] == ",".join(LANDING_COLUMNS)
    assert read_landing(good) == [(row["patient_id"], row["time"], "heart_rate", 71.0)]
