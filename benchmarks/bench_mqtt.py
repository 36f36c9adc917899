"""MQTT collector: sustained observations/s with zero loss, and exactly-once across a SIGKILL.

A publisher on the same machine (this process, paho, QoS 1) sends to a broker; the collector
(``vitalrisk collect mqtt``, a subprocess) lands the observations. Phases:

- ``single``: messages of one observation each, as fast as the publisher can send them.
- ``batched``: messages carrying an array of ``BENCH_MQTT_BATCH`` observations.
- ``crash``: the collector is SIGKILLed when a third of the stream is committed and restarted
  at once; every message the broker acknowledged to the publisher must be in the landing files
  exactly once (redeliveries are counted as duplicates, not landed again).

Rates are end to end: first publish until the collector's journal has committed the last
message. The publisher is ``mosquitto_pub -l`` (C, like a device gateway) when installed, else
paho in this process (``BENCH_MQTT_PUBLISHER=paho`` forces it; paho's own cost per message is
a large share of two shared cores, so a paho run is reported too). The broker is a private Mosquitto started with the team stack's configuration (an
offline session may queue every message; the machine's default broker keeps only 1,000), or
``VITALRISK_MQTT_URL`` when no ``mosquitto`` binary is installed.
Env: ``BENCH_MQTT_MESSAGES`` (single, default 60,000), ``BENCH_MQTT_BATCH`` (10),
``BENCH_MQTT_CRASH_MESSAGES`` (30,000), ``BENCH_MQTT_CRASH_RATE`` (4,000 messages/s).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import psutil

from ops import procs, stack
from ops.services import mosquitto_binary
from ops.settings import TeamSettings, host_port, load_settings

logger = logging.getLogger(__name__)
TOPIC = "vitalrisk/devices/bench-{d}/observations"
TOPIC_FILTER = "vitalrisk/devices/+/observations"
BASE = datetime(2026, 1, 1, tzinfo=UTC)


@contextmanager
def broker(root: Path) -> Iterator[tuple[str, int, str]]:
    """(host, port, kind): a private Mosquitto on a free port, or the configured broker."""
    if mosquitto_binary():
        settings = TeamSettings(
            team_dir=root / "team", mqtt_url=f"mqtt://127.0.0.1:{procs.free_port()}"
        )
        result = stack.up(settings, only=["mqtt"])
        if not result.ok:
            raise RuntimeError(f"could not start a private broker: {result.problems}")
        try:
            yield *host_port(settings.mqtt_url, 1883), "private mosquitto (team config)"
        finally:
            stack.down(settings)
    else:
        url = load_settings().mqtt_url
        yield *host_port(url, 1883), f"configured broker {url}"


class Run:
    """One collector (subprocess) with its own journal and landing folder."""

    def __init__(self, root: Path, host: str, port: int, name: str) -> None:
        self.root, self.host, self.port, self.name = root / name, host, port, name
        self.journal = self.root / "journal.sqlite"
        self.landing = self.root / "landing"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu = 0.0

    def start(self) -> None:
        status = self.journal.with_suffix(".status.json")
        status.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pipelines.cli", "collect", "mqtt"]
        cmd += ["--url", f"mqtt://{self.host}:{self.port}", "--topic", TOPIC_FILTER]
        cmd += ["--client-id", f"bench-{self.name}", "--state", str(self.journal)]
        cmd += ["--landing-dir", str(self.landing), "--quarantine-dir", str(self.root / "q")]
        cmd += ["--roll-seconds", "2"]
        if os.environ.get("BENCH_MQTT_BATCH_WAIT_MS"):
            cmd += ["--batch-wait-ms", os.environ["BENCH_MQTT_BATCH_WAIT_MS"]]
        env = {
            **os.environ,
            "VITALRISK_PSEUDONYM_KEY": "bench-key",
            "VITALRISK_LOG_LEVEL": "WARNING",
        }
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "collector.log").open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        ok = procs.wait_until(lambda: b'"subscribed": true' in _read(status), timeout=60)
        if not ok:
            raise RuntimeError(f"collector did not subscribe; see {self.root / 'collector.log'}")

    def committed(self) -> int:
        if not self.journal.exists():
            return 0
        db = sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT value FROM counters WHERE name='messages'").fetchone()
            return int(row[0]) if row else 0
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    def counters(self) -> dict[str, int]:
        db = sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True, timeout=5)
        try:
            return {k: int(v) for k, v in db.execute("SELECT name, value FROM counters")}
        finally:
            db.close()

    def _account_cpu(self) -> None:
        if self.proc is not None:
            try:
                t = psutil.Process(self.proc.pid).cpu_times()
                self.cpu += t.user + t.system
            except psutil.Error:
                pass

    def kill(self) -> None:
        assert self.proc is not None
        self._account_cpu()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def kill_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        assert self.proc is not None
        self._account_cpu()
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(timeout=60) != 0:
            raise RuntimeError(f"collector exited {self.proc.returncode}; see {self.root}")

    def landed(self) -> pd.DataFrame:
        files = sorted(self.landing.glob("*.csv"))
        if not files:
            return pd.DataFrame(columns=["time"])
        return pd.concat([pd.read_csv(f, usecols=["time"]) for f in files], ignore_index=True)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


class Publisher:
    """QoS 1 publisher; remembers which messages the broker acknowledged (PUBACK)."""

    def __init__(self, host: str, port: int, name: str) -> None:
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{name}", protocol=mqtt.MQTTv5
        )
        self.client.max_inflight_messages_set(2000)
        self.client.max_queued_messages_set(0)
        self.sent: list[tuple[int, Any]] = []
        self.n_acked = 0  # cheap progress counter; acked() is the exact answer
        self.client.on_publish = self._on_publish
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.n_acked += 1

    def publish(self, seq: int, payload: bytes) -> None:
        self.sent.append((seq, self.client.publish(TOPIC.format(d=seq % 50), payload, qos=1)))

    def acked(self) -> set[int]:
        """Sequence numbers of the messages the broker acknowledged (PUBACK received)."""
        return {seq for seq, info in self.sent if info.is_published()}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _message(seq: int, per_message: int) -> bytes:
    if per_message == 1:
        t = BASE + timedelta(seconds=seq)
        return orjson.dumps(
            {
                "message_id": f"m{seq}",
                "patient_id": f"bench-{seq % 200}",
                "time": t.isoformat(),
                "code": "heart_rate",
                "value": 60 + seq % 40,
                "unit": "/min",
            }
        )
    items = [
        {
            "time": (BASE + timedelta(seconds=seq * per_message + j)).isoformat(),
            "code": "heart_rate",
            "value": 60 + j % 40,
        }
        for j in range(per_message)
    ]
    return orjson.dumps(
        {
            "message_id": f"m{seq}",
            "patient_id": f"bench-{seq % 200}",
            "source": "wearable",
            "observations": items,
        }
    )


def _wait_committed(run: Run, n: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while run.committed() < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{run.name}: only {run.committed()} of {n} messages committed")
        time.sleep(0.02)
    return time.perf_counter()


def _publish_all(host: str, port: int, name: str, payloads: list[bytes], tool: str) -> None:
    """Send every payload (QoS 1) and return once the broker acknowledged all of them."""
    if tool == "mosquitto_pub":
        lines = b"".join(p + b"\n" for p in payloads)
        cmd = ["mosquitto_pub", "-h", host, "-p", str(port), "-V", "mqttv5", "-q", "1"]
        cmd += ["-i", f"bench-pub-{name}", "-t", TOPIC.format(d=name), "-l"]
        proc = subprocess.run(cmd, input=lines, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"mosquitto_pub failed: {proc.stderr.decode()[-500:]}")
        return
    pub = Publisher(host, port, name)
    for i, p in enumerate(payloads):
        pub.publish(i, p)
    procs.wait_until(lambda: pub.n_acked >= len(payloads), timeout=300)
    pub.close()


def _throughput(
    root: Path, host: str, port: int, name: str, n: int, per_message: int, tool: str
) -> dict:
    run = Run(root, host, port, name)
    try:
        run.start()
        payloads = [_message(i, per_message) for i in range(n)]
        t0 = time.perf_counter()
        _publish_all(host, port, name, payloads, tool)
        t_pub = time.perf_counter()
        t_end = _wait_committed(run, n, timeout=600)
        run.stop()
    finally:
        run.kill_if_running()
    landed = run.landed()
    expected = n * per_message
    return {
        "publisher": tool,
        "messages": n,
        "observations_per_message": per_message,
        "observations_published": expected,
        "observations_landed": len(landed),
        "lost": expected - int(landed["time"].nunique()),
        "seconds": round(t_end - t0, 3),
        "observations_per_s": round(expected / (t_end - t0)),
        "messages_per_s": round(n / (t_end - t0)),
        "publisher_seconds": round(t_pub - t0, 3),
        "collector_cpu_s": round(run.cpu, 2),
        "collector_cpu_us_per_observation": round(run.cpu / expected * 1e6, 1),
        "counters": run.counters(),
    }


def _killer(run: Run, at: int, report: dict[str, float]) -> threading.Thread:
    """SIGKILL the collector once ``at`` messages are committed, restart it at once."""

    def watch() -> None:
        while run.committed() < at:
            time.sleep(0.01)
        report["killed_after_committed"] = run.committed()
        run.kill()
        t = time.perf_counter()
        run.start()
        report["restart_seconds"] = round(time.perf_counter() - t, 2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _crash_stream(
    run: Run, host: str, port: int, n: int, rate: float
) -> tuple[set[int], dict[str, float]]:
    run.start()
    pub = Publisher(host, port, "crash")
    payloads = [_message(i, 1) for i in range(n)]
    report: dict[str, float] = {}
    killer = _killer(run, n // 3, report)
    t0 = time.perf_counter()
    for i, p in enumerate(payloads):
        pub.publish(i, p)
        ahead = t0 + (i + 1) / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    procs.wait_until(lambda: pub.n_acked >= n, timeout=120)
    acked = pub.acked()
    killer.join(timeout=600)
    _wait_committed(run, len(acked), timeout=600)
    pub.close()
    run.stop()
    return acked, report


def _crash(root: Path, host: str, port: int, n: int, rate: float) -> dict:
    """A paced device stream; the collector is SIGKILLed a third of the way through."""
    run = Run(root, host, port, "crash")
    try:
        acked, report = _crash_stream(run, host, port, n, rate)
    finally:
        run.kill_if_running()
    landed = run.landed()
    offset = pd.to_datetime(landed["time"], utc=True) - pd.Timestamp(BASE)
    counts = offset.dt.total_seconds().round().astype(int).value_counts()
    missing = acked - set(counts.index)
    killed = "killed_after_committed" in report
    return {
        "messages": n,
        "publish_rate_per_s": rate,
        "acknowledged_by_broker": len(acked),
        **report,
        "still_to_commit_when_killed": n - int(report.get("killed_after_committed", n)),
        "landed_rows": len(landed),
        "acked_missing": len(missing),
        "landed_more_than_once": int((counts > 1).sum()),
        "exactly_once": bool(killed and not missing and (counts == 1).all()),
        "counters": run.counters(),
    }


def main() -> dict:
    n = int(os.environ.get("BENCH_MQTT_MESSAGES", "60000"))
    per = int(os.environ.get("BENCH_MQTT_BATCH", "10"))
    n_crash = int(os.environ.get("BENCH_MQTT_CRASH_MESSAGES", "30000"))
    rate = float(os.environ.get("BENCH_MQTT_CRASH_RATE", "4000"))
    with tempfile.TemporaryDirectory(prefix="vitalrisk-bench-mqtt-") as tmp:
        root = Path(tmp)
        with broker(root) as (host, port, kind):
            out: dict[str, Any] = {"broker": kind, "cpus": os.cpu_count()}
            tool = os.environ.get("BENCH_MQTT_PUBLISHER") or (
                "mosquitto_pub" if shutil.which("mosquitto_pub") else "paho"
            )
            out["single"] = _throughput(root, host, port, "single", n, 1, tool)
            logger.info("single: %s obs/s", out["single"]["observations_per_s"])
            if tool != "paho":
                out["single_paho"] = _throughput(root, host, port, "single-paho", n // 3, 1, "paho")
                logger.info("single, paho: %s obs/s", out["single_paho"]["observations_per_s"])
            out["batched"] = _throughput(root, host, port, "batched", max(1, n // per), per, tool)
            logger.info("batched: %s obs/s", out["batched"]["observations_per_s"])
            out["crash"] = _crash(root, host, port, n_crash, rate)
            logger.info("crash: exactly once = %s", out["crash"]["exactly_once"])
    out["target_observations_per_s"] = 5000
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(orjson.dumps(main(), option=orjson.OPT_INDENT_2).decode())
