"""``vitalrisk team``: the local team stack (up, down, status, env) and its scheduled jobs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import UserError
from ops.settings import TeamSettings

if TYPE_CHECKING:
    from ops.stack import StackResult

HELP = "team mode: start/stop/check the local stack, print its env, generate schedules"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env-file",
        default=None,
        help="settings file (default: $VITALRISK_TEAM_ENV or team.env at the repository root)",
    )
    sub = parser.add_subparsers(dest="team_command", metavar="ACTION", required=True)
    for name, help_ in (
        ("up", "start what is not running (idempotent), create the MLflow database and bucket"),
        ("down", "stop what `team up` started here, nothing else"),
        ("status", "every service: managed/external/remote/stopped and its health check"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--only", nargs="+", metavar="SERVICE", help="only these services")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser(
        "env",
        help="print `export` lines pointing MLflow, DVC, boto3 and Dask at the stack",
        description='eval "$(vitalrisk team env)" before running vitalrisk/dvc in team mode',
    )
    s = sub.add_parser("schedule", help="write systemd units or print cron entries for monitoring")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--systemd", metavar="DIR", help="write vitalrisk-monitor.{service,timer}")
    where.add_argument("--cron", action="store_true", help="print crontab lines")
    s.add_argument("--on-calendar", default="hourly", help="systemd OnCalendar= (default hourly)")
    s.add_argument("--cron-schedule", default="17 * * * *", help="five cron fields")
    s.add_argument("--repo", default=None, help="repository the job runs in (default: this one)")
    s.add_argument("--embedded", action="store_true", help="job without the team settings")
    s.add_argument("monitor_args", nargs="*", help="arguments for `vitalrisk monitor` (after --)")
    j = sub.add_parser(
        "monitor-job",
        help="run `vitalrisk monitor`; on exit 20 run `vitalrisk monitor --retrain` (schedulers)",
    )
    j.add_argument("--team", action="store_true", help="point the monitor at the team stack")
    j.add_argument("monitor_args", nargs="*", help="arguments for `vitalrisk monitor` (after --)")


def run(args: argparse.Namespace) -> int:
    from ops.settings import load_settings

    settings = load_settings(args.env_file)
    handler = {
        "up": _up,
        "down": _down,
        "status": _status,
        "env": _env,
        "schedule": _schedule,
        "monitor-job": _monitor_job,
    }[args.team_command]
    return handler(args, settings)


def _print_table(result: StackResult) -> None:
    rows = [("service", "state", "pid", "url", "check")]
    for s in result.services:
        rows.append((s.name, s.state, str(s.pid or "-"), s.url, s.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])


def _up(args: argparse.Namespace, settings: TeamSettings) -> int:
    from ops import stack
    from ops.settings import REPO_ROOT

    try:
        result = stack.up(settings, args.only, dvc_repo=REPO_ROOT)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    _print_table(result)
    for p in result.problems:
        print(f"problem: {p}", file=sys.stderr)
    if result.ok:
        print('team stack up. In your shell: eval "$(vitalrisk team env)"')
    return 0 if result.ok else 1


def _down(args: argparse.Namespace, settings: TeamSettings) -> int:
    from ops import stack

    stopped = stack.down(settings, args.only)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing (no process of ours ran)"))
    return 0


def _status(args: argparse.Namespace, settings: TeamSettings) -> int:
    from ops import stack

    try:
        result = stack.status(settings, args.only)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps([s.__dict__ for s in result.services], indent=2))
    else:
        _print_table(result)
    return 0 if result.ok else 1


def _env(args: argparse.Namespace, settings: TeamSettings) -> int:
    from ops.settings import client_env

    for key, value in sorted(client_env(settings).items()):
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _schedule(args: argparse.Namespace, settings: TeamSettings) -> int:
    from ops import schedule
    from ops.settings import REPO_ROOT

    spec = schedule.ScheduleSpec(
        repo=Path(args.repo).resolve() if args.repo else REPO_ROOT,
        on_calendar=args.on_calendar,
        cron=args.cron_schedule,
        team=not args.embedded,
        monitor_args=tuple(args.monitor_args),
    )
    if len(spec.cron.split()) != 5:
        raise UserError(f"--cron-schedule {spec.cron!r}: expected five fields (m h dom mon dow)")
    if args.cron:
        print(schedule.cron_entries(spec), end="")
        return 0
    for path in schedule.write_systemd(spec, Path(args.systemd)):
        print(f"wrote {path}")
    print(
        f"install: cp {args.systemd}/{schedule.UNIT}.* /etc/systemd/system/ && "
        f"systemctl daemon-reload && systemctl enable --now {schedule.UNIT}.timer"
    )
    return 0


def _monitor_job(args: argparse.Namespace, settings: TeamSettings) -> int:
    from ops import schedule
    from ops.settings import client_env

    if args.team:
        os.environ.update(client_env(settings))
    monitor, retrain = schedule.job_commands(
        [sys.executable, "-m", "pipelines.cli"], args.monitor_args
    )
    lock = settings.state_dir / "monitor-job.lock"
    result = schedule.monitor_job(monitor, retrain, lock)
    level = logging.INFO if result.exit_code in (0, schedule.MONITOR_RETRAIN) else logging.WARNING
    logger.log(level, "monitor job: %s (exit %d)", result.message, result.exit_code)
    return result.exit_code
