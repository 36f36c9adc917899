"""MQTT collector: message format, accounting, durable journal, and delivery through a real broker.

Broker tests run `vitalrisk collect mqtt` as a subprocess against a private Mosquitto (the
team configuration) and check, from the landing files, that every message is landed once:
after a SIGKILL mid-stream, and after a crash between the journal commit and the ack.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from core.vocabulary import load_vocabulary
from governance.pseudonym import pseudonymise
from ingest.config import IngestConfig
from ingest.mqtt_collector import (
    CollectorConfig,
    Journal,
    JournalLocked,
    Lander,
    Message,
    Validator,
    content_id,
    parse_message,
)
from ops import procs, stack
from ops.services import mosquitto_binary
from ops.settings import TeamSettings, host_port, load_settings

TOPIC = "vitalrisk/devices/dev-1/observations"
FILTER = "vitalrisk/devices/+/observations"
KEY = b"test-key"
BASE = datetime(2026, 1, 1, tzinfo=UTC)


def obs(seq: int, **kw: object) -> dict:
    return {
        "message_id": f"m{seq}",
        "patient_id": f"MRN-{seq % 7}",
        "time": (BASE + timedelta(seconds=seq)).isoformat(),
        "code": "heart_rate",
        "value": 60 + seq % 40,
        "unit": "/min",
        **kw,
    }


def msg(payload: dict | list | bytes, mid: int = 1, topic: str = TOPIC) -> Message:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Message(mid, 1, topic, data, datetime.now(UTC).isoformat())


def pseudo(sid: str) -> str:
    return pseudonymise(sid, KEY)


def make_lander(root: Path, **kw: object) -> Lander:
    cfg = CollectorConfig(
        state_path=root / "journal.sqlite",
        landing_dir=root / "landing",
        quarantine_dir=root / "quarantine",
        roll_seconds=0,
        **kw,  # type: ignore[arg-type]
    )
    v = Validator(
        load_vocabulary(), IngestConfig(), functools.lru_cache(None)(pseudo), "wearable", 1000
    )
    return Lander(cfg, v)


def landed(root: Path) -> pd.DataFrame:
    files = sorted((root / "landing").glob("*.csv"))
    if not files:
        return pd.DataFrame(columns=["patient_id", "time", "code", "value", "unit", "source"])
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)


def quarantined(root: Path) -> pd.DataFrame:
    files = sorted((root / "quarantine").glob("*.csv"))
    return (
        pd.concat([pd.read_csv(f) for f in files], ignore_index=True) if files else pd.DataFrame()
    )


# -- message format -------------------------------------------------------------------------------


def test_single_envelope_and_array_messages():
    one = parse_message(TOPIC, json.dumps(obs(1)).encode(), 10)
    assert one.message_id == "m1" and one.problem is None and len(one.items) == 1
    assert "message_id" not in one.items[0]

    env = {
        "message_id": "b1",
        "patient_id": "MRN-9",
        "source": "home",
        "observations": [
            {"time": "2026-01-01T00:00:00Z", "code": "spo2", "value": 97},
            {"time": "2026-01-01T00:00:00Z", "code": "spo2", "value": 96, "patient_id": "MRN-8"},
        ],
    }
    batch = parse_message(TOPIC, json.dumps(env).encode(), 10)
    assert [i["patient_id"] for i in batch.items] == ["MRN-9", "MRN-8"]  # items may override
    assert {i["source"] for i in batch.items} == {"home"}

    payload = json.dumps([obs(1), obs(2)]).encode()
    arr = parse_message(TOPIC, payload, 10)
    assert len(arr.items) == 2 and arr.message_id == content_id(TOPIC, payload)
    assert parse_message(TOPIC, payload, 10).message_id == arr.message_id  # a redelivery


@pytest.mark.parametrize(
    ("payload", "field", "reason"),
    [
        (b"{nope", "message", "invalid JSON"),
        (b"42", "message", "JSON object or array"),
        (json.dumps({"observations": []}).encode(), "observations", "non-empty"),
        (json.dumps({"observations": [obs(1)] * 3}).encode(), "observations", "at most 2"),
        (json.dumps({"observations": [obs(1)], "extra": 1}).encode(), "message", "unknown field"),
        (json.dumps({**obs(1), "message_id": 7}).encode(), "message_id", "string"),
    ],
)
def test_structural_problems_reject_the_message(payload, field, reason):
    p = parse_message(TOPIC, payload, 2)
    assert p.problem is not None and p.problem[0] == field and reason in p.problem[1]


# -- journal and accounting (no broker) ---------------------------------------------------------


def test_batch_accounting_quarantine_and_ingest_reads_the_landing(tmp_path):
    from ingest.ingestion import ingest

    lander = make_lander(tmp_path)
    batch = [
        msg(obs(1)),
        msg(obs(1)),  # same id twice in one batch: one landed, one duplicate
        msg(obs(2, value=99.5, unit="[degF]", code="body_temp")),  # converted to Cel
        msg(obs(3, value=400)),  # implausible heart rate
        msg(obs(4, code="glucoze")),  # unknown code
        msg(obs(5, units="/min")),  # misspelt field: never guess the unit
        msg(b"{broken MRN-42"),  # not JSON, raw identifier in the text
        msg(
            {
                "message_id": "b1",
                "patient_id": "MRN-1",
                "observations": [
                    {"time": "2026-01-01T01:00:00Z", "code": "8867-4", "value": 70},
                    {"time": "not a time", "code": "spo2", "value": 97},
                ],
            }
        ),
    ]
    first = lander.land(batch)
    assert first.duplicates == 1
    again = lander.land([msg(obs(1)), msg(obs(2, value=99.5, unit="[degF]", code="body_temp"))])
    assert again.duplicates == 2 and not again.new  # a redelivery is counted, not landed
    lander.roll(force=True)
    counters = lander.journal.counters()
    lander.close()
    assert counters == {"messages": 7, "duplicates": 3, "read": 8, "accepted": 3, "quarantined": 5}
    assert counters["read"] == counters["accepted"] + counters["quarantined"]

    rows = landed(tmp_path)
    assert len(rows) == 3 and rows["patient_id"].str.startswith("p_").all()
    assert rows.loc[rows["code"] == "body_temp", "value"].round(2).tolist() == [37.5]
    q = quarantined(tmp_path)
    assert sorted(q["field"]) == ["code", "message", "time", "units", "value"]
    text = q.to_csv()
    assert "MRN-" not in text, "quarantine must hold pseudonyms only"
    assert q["reason"].str.len().gt(10).all()

    cfg = IngestConfig(missing_consent="include")
    result = ingest([tmp_path / "landing"], cfg, load_vocabulary(), KEY)
    assert len(result.observations) == 3 and len(result.quarantine) == 0
    assert set(result.observations["patient_id"]) == set(rows["patient_id"])


def test_message_ids_are_per_device_topic(tmp_path):
    """Two devices that both number their messages from 1 are two messages, not a duplicate."""
    lander = make_lander(tmp_path)
    batch = lander.land(
        [
            msg(obs(1)),
            msg(obs(1, time="2026-01-02T00:00:00Z"), topic="vitalrisk/devices/dev-2/observations"),
        ]
    )
    lander.close()
    assert batch.duplicates == 0 and len(batch.new) == 2


def test_a_roll_interrupted_by_a_crash_is_finished_with_the_same_file(tmp_path):
    lander = make_lander(tmp_path)
    lander.land([msg(obs(i), mid=i) for i in range(1, 6)])
    file_id = lander.journal.plan_roll(lander._names)  # planned, then the process dies
    assert file_id is not None
    (name,) = [n for _, n, _ in lander.journal.unwritten_files()]
    lander.land([msg(obs(i), mid=i) for i in range(6, 9)])  # committed after the plan
    lander.close()

    again = make_lander(tmp_path)
    assert again.recover() == 1
    assert (tmp_path / "landing" / name).is_file()
    again.roll(force=True)
    again.close()
    rows = landed(tmp_path)
    assert len(rows) == 8 and rows["time"].is_unique


def test_one_journal_one_collector(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    try:
        with pytest.raises(JournalLocked, match="another collector"):
            Journal(tmp_path / "j.sqlite")
    finally:
        j.close()


def test_bad_topic_filter_is_a_config_error():
    with pytest.raises(ValueError, match="whole level"):
        CollectorConfig(topics=["vitalrisk/devices/dev-+/observations"])


# -- through a real broker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    if mosquitto_binary():
        root = tmp_path_factory.mktemp("broker")
        settings = TeamSettings(team_dir=root, mqtt_url=f"mqtt://127.0.0.1:{procs.free_port()}")
        result = stack.up(settings, ["mqtt"])
        assert result.ok, result.problems
        try:
            yield host_port(settings.mqtt_url, 1883)
        finally:
            stack.down(settings)
        return
    host, port = host_port(load_settings().mqtt_url, 1883)
    if not procs.port_open(host, port):
        pytest.skip("no MQTT broker (Debian: apt-get install mosquitto)")
    yield host, port


class CollectorProcess:
    def __init__(self, root: Path, broker: tuple[str, int], client_id: str) -> None:
        self.root, self.broker, self.client_id = root, broker, client_id
        self.journal = root / "journal.sqlite"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        status = self.journal.with_suffix(".status.json")
        status.unlink(missing_ok=True)
        host, port = self.broker
        cmd = [
            sys.executable,
            "-m",
            "pipelines.cli",
            "collect",
            "mqtt",
            "--url",
            f"mqtt://{host}:{port}",
            "--topic",
            FILTER,
            "--client-id",
            self.client_id,
            "--state",
            str(self.journal),
            "--landing-dir",
            str(self.root / "landing"),
            "--quarantine-dir",
            str(self.root / "quarantine"),
            "--roll-seconds",
            "0.5",
            "--batch-max",
            "200",
        ]
        env = {**os.environ, "VITALRISK_PSEUDONYM_KEY": KEY.decode()}
        log = (self.root / "collector.log").open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        assert procs.wait_until(
            lambda: status.is_file() and '"subscribed": true' in status.read_text(), timeout=60
        ), (self.root / "collector.log").read_text()

    def counters(self) -> dict[str, int]:
        db = sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True, timeout=5)
        try:
            return {k: int(v) for k, v in db.execute("SELECT name, value FROM counters")}
        finally:
            db.close()

    def wait_committed(self, n: int, timeout: float = 60) -> None:
        ok = procs.wait_until(lambda: self.counters().get("messages", 0) >= n, timeout)
        assert ok, f"committed {self.counters()} of {n}"

    def signal(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def kill_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def collector(broker, tmp_path) -> Iterator[Callable[[str], CollectorProcess]]:
    """Collector subprocesses of one test; whatever still runs at the end is killed."""
    made: list[CollectorProcess] = []

    def make(client_id: str) -> CollectorProcess:
        made.append(CollectorProcess(tmp_path, broker, client_id))
        return made[-1]

    yield make
    for c in made:
        c.kill_if_running()


def publisher(broker: tuple[str, int], name: str) -> object:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.max_queued_messages_set(0)
    c.connect(*broker)
    c.loop_start()
    return c


@pytest.mark.slow
def test_sigkill_mid_stream_every_acknowledged_message_lands_once(broker, collector, tmp_path):
    coll = collector("test-kill")
    coll.start()
    pub = publisher(broker, "test-kill-pub")
    infos, n = [], 3000
    for i in range(n):
        infos.append(pub.publish(TOPIC, json.dumps(obs(i)), qos=1))  # type: ignore[attr-defined]
        if i == n // 3:
            coll.wait_committed(n // 4)
            assert coll.signal(signal.SIGKILL) == -signal.SIGKILL
            coll.start()  # publishing goes on against the broker's queued session
        if i % 100 == 0:
            time.sleep(0.02)
    assert procs.wait_until(lambda: all(x.is_published() for x in infos), 60)
    coll.wait_committed(n)
    assert coll.signal(signal.SIGTERM) == 0
    pub.disconnect()  # type: ignore[attr-defined]
    rows = landed(tmp_path)
    assert len(rows) == n and rows["time"].is_unique
    c = coll.counters()
    assert c["messages"] == c["read"] == c["accepted"] == n and c["quarantined"] == 0


@pytest.mark.slow
def test_crash_after_commit_before_ack_is_redelivered_and_counted_once(broker, collector, tmp_path):
    """The narrow window: batch committed, process gone before the PUBACKs left."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: list[Message] = []
    crashed = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="test-window",
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    crashed.on_message = lambda c, u, m: got.append(
        Message(m.mid, m.qos, m.topic, bytes(m.payload), datetime.now(UTC).isoformat())
    )
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    crashed.connect(*broker, clean_start=False, properties=props)
    crashed.loop_start()
    crashed.subscribe(FILTER, qos=1)
    time.sleep(0.5)
    pub = publisher(broker, "test-window-pub")
    for i in range(50):
        pub.publish(TOPIC, json.dumps(obs(i)), qos=1).wait_for_publish(10)  # type: ignore[attr-defined]
    assert procs.wait_until(lambda: len(got) == 50, 20)
    lander = make_lander(tmp_path, client_id="test-window")
    lander.land(got)  # durable ...
    lander.close()
    crashed.loop_stop()
    crashed.socket().close()  # ... and gone without a single PUBACK

    coll = collector("test-window")
    coll.start()
    assert procs.wait_until(lambda: coll.counters()["duplicates"] >= 50, 30), coll.counters()
    assert coll.signal(signal.SIGTERM) == 0
    pub.disconnect()  # type: ignore[attr-defined]
    c = coll.counters()
    assert c["messages"] == 50 and c["duplicates"] == 50 and c["accepted"] == 50
    rows = landed(tmp_path)
    assert len(rows) == 50 and rows["time"].is_unique


def test_cli_refuses_bad_input_with_a_message(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["collect", "mqtt", "--url", "mqtt://127.0.0.1:1", "--topic", "a/b+/c"]) == 2
    assert "whole level" in capsys.readouterr().err
    closed = f"mqtt://127.0.0.1:{procs.free_port()}"
    args = ["collect", "mqtt", "--url", closed, "--topic", FILTER, "--state", "j.sqlite"]
    assert main(args) == 2
    assert "MQTT broker" in capsys.readouterr().err
    assert main(["collect", "status", "--state", "none.sqlite"]) == 2
    assert "no collector journal" in capsys.readouterr().err
