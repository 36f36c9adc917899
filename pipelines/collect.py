"""``vitalrisk collect mqtt``: devices over MQTT into the landing area (``vitalrisk ingest`` reads it).

``vitalrisk collect status`` prints the collector journal's counters (exactly-once accounting:
``read = accepted + quarantined``; ``duplicates`` = redeliveries counted once).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import ValidationError

from core.errors import UserError

if TYPE_CHECKING:
    from ingest.mqtt_collector import CollectorConfig

HELP = "collect device observations over MQTT (QoS 1, durable before ack) into the landing area"

logger = logging.getLogger(__name__)
PASSWORD_ENV = "VITALRISK_MQTT_PASSWORD"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="collect_command", metavar="SOURCE", required=True)
    m = sub.add_parser("mqtt", help="subscribe to device topics and land observations")
    m.add_argument("--url", default=None, help="broker (default: VITALRISK_MQTT_URL from team.env)")
    m.add_argument("--topic", action="append", default=None, help="topic filter (repeatable)")
    m.add_argument("--client-id", default="vitalrisk-collector", help="MQTT client id = session")
    m.add_argument(
        "--landing-dir",
        default=None,
        help="landing area (default: $VITALRISK_LANDING_DIR or landing)",
    )
    m.add_argument("--quarantine-dir", default="logs/mqtt/quarantine", help="rejected records")
    m.add_argument("--state", default=None, help="journal (default: logs/mqtt/<client id>.sqlite)")
    # tunables: unset = CollectorConfig's default (one place for each default)
    m.add_argument("--batch-max", type=int, help="messages per transaction (2000)")
    m.add_argument("--batch-wait-ms", type=float, help="max wait to fill a batch (200)")
    m.add_argument("--roll-seconds", type=float, help="a landing file every N s (5)")
    m.add_argument("--receive-maximum", type=int, help="unacknowledged in flight (10000)")
    m.add_argument("--env-file", default=None, help="team settings file (default team.env)")
    m.add_argument(
        "--params", default="params.yaml", help="its `ingest` section: the validation rules"
    )
    s = sub.add_parser("status", help="counters of a collector journal")
    s.add_argument("--state", default="logs/mqtt/vitalrisk-collector.sqlite", help="journal")


def run(args: argparse.Namespace) -> int:
    if args.collect_command == "status":
        return _status(Path(args.state))
    return _mqtt(args)


def _status(path: Path) -> int:
    if not path.is_file():
        raise UserError(f"{path}: no collector journal (run `vitalrisk collect mqtt` first)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        counters = dict(db.execute("SELECT name, value FROM counters"))
        pending = db.execute("SELECT count(*) FROM batches WHERE file_id IS NULL").fetchone()[0]
    finally:
        db.close()
    print(json.dumps({"counters": counters, "batches_not_yet_in_a_file": pending}, indent=2))
    return 0


def _config(args: argparse.Namespace) -> CollectorConfig:
    from ingest.mqtt_collector import CollectorConfig
    from ops.settings import load_settings

    settings = load_settings(args.env_file)
    url = args.url or settings.mqtt_url
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise UserError(f"--url {url!r}: expected mqtt://host:port or mqtts://host:port")
    tunables = {
        k: getattr(args, k)
        for k in ("batch_max", "batch_wait_ms", "roll_seconds", "receive_maximum")
        if getattr(args, k) is not None
    }
    try:
        return CollectorConfig(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883),
            tls=parts.scheme in ("mqtts", "ssl"),
            username=parts.username,
            password=os.environ.get(PASSWORD_ENV),
            topics=args.topic or [settings.mqtt_topic],
            client_id=args.client_id,
            landing_dir=Path(
                args.landing_dir or os.environ.get("VITALRISK_LANDING_DIR") or "landing"
            ),
            quarantine_dir=Path(args.quarantine_dir),
            state_path=Path(args.state or f"logs/mqtt/{args.client_id}.sqlite"),
            **tunables,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(problems) from None


def _mqtt(args: argparse.Namespace) -> int:
    from core.params import load_section, validate_section
    from core.vocabulary import load_vocabulary
    from governance.pseudonym import PseudonymKeyError, get_key, pseudonymise
    from ingest.config import IngestConfig
    from ingest.mqtt_collector import Collector, JournalLocked, Lander, Validator

    cfg = _config(args)
    try:
        key = get_key()
    except PseudonymKeyError as exc:
        raise UserError(str(exc)) from None
    pseudo = functools.lru_cache(maxsize=200_000)(functools.partial(pseudonymise, key=key))
    params = Path(args.params)
    ingest_cfg = (
        load_section(IngestConfig, "ingest", params)
        if params.is_file()
        else validate_section(IngestConfig, "ingest", {}, str(params))
    )
    validator = Validator(
        load_vocabulary(), ingest_cfg, pseudo, cfg.default_source, cfg.max_items_per_message
    )
    try:
        lander = Lander(cfg, validator)
    except JournalLocked as exc:
        raise UserError(str(exc)) from None
    collector = Collector(cfg, lander)
    previous = {
        sig: signal.signal(sig, lambda *_: collector.stop_event.set())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        counters = collector.run()
    except (OSError, ConnectionError) as exc:
        raise UserError(f"MQTT broker {cfg.host}:{cfg.port}: {exc}") from None
    finally:
        lander.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps({"stopped": True, "counters": counters}))
    return 0
