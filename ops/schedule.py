"""Scheduled monitoring and retraining through the machine's own scheduler (systemd or cron).

``vitalrisk monitor`` exits 0 (ok), 10 (warn) or 20 (retrain); the job wrapper turns those into
actions: nothing, a warning in the journal, or ``vitalrisk monitor --retrain`` (copy new data,
``dvc repro``; the register stage's promotion gate still decides what reaches patients). One
job runs at a time (a lock next to the team state), so a slow retrain is never started twice.
"""

from __future__ import annotations

import fcntl
import logging
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MONITOR_OK, MONITOR_WARN, MONITOR_RETRAIN, MONITOR_BAD_INPUT = 0, 10, 20, 2
#: job exit codes: the monitor's (0/10/2), 20 = retrained, 1 = failed, 75 = previous run busy
JOB_FAILED, JOB_BUSY = 1, 75
UNIT = "vitalrisk-monitor"


@dataclass(frozen=True)
class JobResult:
    exit_code: int
    monitor_code: int | None
    retrained: bool
    message: str


Runner = Callable[[Sequence[str]], int]


def _run(cmd: Sequence[str]) -> int:
    return subprocess.run(list(cmd), check=False).returncode


def monitor_job(
    monitor_cmd: Sequence[str],
    retrain_cmd: Sequence[str],
    lock_path: Path,
    run: Runner = _run,
) -> JobResult:
    """Run the monitor; on its 'retrain' verdict run ``retrain_cmd``. Never two at once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return JobResult(JOB_BUSY, None, False, f"previous job still running ({lock_path})")
        code = run(monitor_cmd)
        return _react(code, retrain_cmd, run)


def _react(code: int, retrain_cmd: Sequence[str], run: Runner) -> JobResult:
    if code == MONITOR_OK:
        return JobResult(0, code, False, "verdict ok")
    if code == MONITOR_WARN:
        return JobResult(MONITOR_WARN, code, False, "verdict warn: no retraining, see the report")
    if code == MONITOR_BAD_INPUT:
        return JobResult(code, code, False, "monitor refused its input (exit 2): nothing retrained")
    if code != MONITOR_RETRAIN:
        return JobResult(JOB_FAILED, code, False, f"monitor failed (exit {code})")
    rc = run(retrain_cmd)
    if rc != 0:
        return JobResult(
            JOB_FAILED, code, False, f"verdict retrain, but retraining failed (exit {rc})"
        )
    return JobResult(MONITOR_RETRAIN, code, True, "verdict retrain: retrained (dvc repro)")


def job_commands(
    vitalrisk: Sequence[str], monitor_args: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The monitor run and the retraining run (same arguments; no second workspace snapshot)."""
    monitor = [*vitalrisk, "monitor", *monitor_args]
    retrain = [*monitor, "--retrain", "--force", "--no-workspace"]
    return monitor, retrain


# -- generated scheduler entries ----------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleSpec:
    repo: Path
    #: ``systemd.time`` calendar expression of the monitor timer
    on_calendar: str = "hourly"
    #: five-field cron schedule of the same job
    cron: str = "17 * * * *"
    team: bool = True
    monitor_args: tuple[str, ...] = ()
    executable: Path = field(default_factory=lambda: Path(sys.executable).parent / "vitalrisk")
    #: optional root-owned file with secrets (PGPASSWORD, AWS_*, VITALRISK_PSEUDONYM_KEY, ...)
    secrets_file: str = "/etc/vitalrisk/secrets.env"

    def job_args(self) -> list[str]:
        team = ["--team"] if self.team else []
        return [str(self.executable), "team", "monitor-job", *team, "--", *self.monitor_args]


def _systemd_quote(args: Sequence[str]) -> str:
    # systemd unit files take shell-like quoting; '%' starts a specifier and must be doubled
    return " ".join(shlex.quote(a) for a in args).replace("%", "%%")


def systemd_units(spec: ScheduleSpec) -> dict[str, str]:
    """``vitalrisk-monitor.service`` (oneshot) and ``vitalrisk-monitor.timer``."""
    service = f"""[Unit]
Description=vitalrisk: monitor drift and performance, retrain on a 'retrain' verdict
Documentation=file://{spec.repo}/README.md
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
WorkingDirectory={spec.repo}
# secrets only from the environment: a root-owned 0600 file outside git, if present
EnvironmentFile=-{spec.secrets_file}
ExecStart={_systemd_quote(spec.job_args())}
# 10 = warn (report only), 20 = retrained, 75 = previous run still busy: not failures
SuccessExitStatus=10 20 75
TimeoutStartSec=6h
Nice=10
"""
    timer = f"""[Unit]
Description=vitalrisk: run {UNIT}.service {spec.on_calendar}

[Timer]
OnCalendar={spec.on_calendar}
Persistent=true
RandomizedDelaySec=120

[Install]
WantedBy=timers.target
"""
    return {f"{UNIT}.service": service, f"{UNIT}.timer": timer}


def cron_entries(spec: ScheduleSpec) -> str:
    """A user crontab (``crontab -e``): the same job, output appended to a log."""
    cmd = _cron_quote(
        f"cd {shlex.quote(str(spec.repo))} && {' '.join(shlex.quote(a) for a in spec.job_args())}"
        " >> logs/monitor-job.log 2>&1"
    )
    return f"""# vitalrisk: monitor drift and performance, retrain on a 'retrain' verdict
# exit codes of the job: 0 ok, 10 warn, 20 retrained, 2 bad input, 1 failed, 75 busy
# secrets (PGPASSWORD, AWS_*, VITALRISK_PSEUDONYM_KEY) come from the environment of cron
SHELL=/bin/sh
{spec.cron} {cmd}
"""


def _cron_quote(command: str) -> str:
    # in a crontab line an unescaped '%' ends the command (the rest becomes stdin)
    return command.replace("%", r"\%")


def write_systemd(spec: ScheduleSpec, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in systemd_units(spec).items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written
