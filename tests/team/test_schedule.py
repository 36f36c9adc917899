"""Scheduled monitoring: generated systemd units and cron lines, and the job's exit-code actions."""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ops import schedule
from ops.settings import REPO_ROOT


def _script(tmp_path: Path, name: str, code: int, marker: str | None = None) -> list[str]:
    """A real command that exits with ``code`` (and leaves a marker file when it ran)."""
    body = f"import pathlib, sys; pathlib.Path({marker!r}).touch(); " if marker else "import sys; "
    return [sys.executable, "-c", body + f"sys.exit({code})"]


@pytest.mark.parametrize(
    ("monitor_code", "job_code", "retrained"),
    [(0, 0, False), (10, 10, False), (20, 20, True), (2, 2, False), (1, 1, False), (137, 1, False)],
)
def test_job_reacts_to_each_monitor_exit_code(tmp_path, monitor_code, job_code, retrained):
    marker = tmp_path / "retrained"
    result = schedule.monitor_job(
        _script(tmp_path, "monitor", monitor_code),
        _script(tmp_path, "retrain", 0, str(marker)),
        tmp_path / "job.lock",
    )
    assert (result.exit_code, result.monitor_code, result.retrained) == (
        job_code,
        monitor_code,
        retrained,
    )
    assert marker.exists() is retrained


def test_failed_retraining_fails_the_job(tmp_path):
    result = schedule.monitor_job(
        _script(tmp_path, "monitor", 20), _script(tmp_path, "retrain", 3), tmp_path / "job.lock"
    )
    assert (
        result.exit_code == schedule.JOB_FAILED and "retraining failed (exit 3)" in result.message
    )


def test_a_second_job_does_not_start_while_one_runs(tmp_path):
    lock = tmp_path / "job.lock"
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        result = schedule.monitor_job(
            _script(tmp_path, "m", 20), _script(tmp_path, "r", 0, str(tmp_path / "ran")), lock
        )
    assert result.exit_code == schedule.JOB_BUSY and not (tmp_path / "ran").exists()


def test_retrain_command_is_the_monitor_with_retrain():
    monitor, retrain = schedule.job_commands(["vitalrisk"], ["--out", "reports/m"])
    assert monitor == ["vitalrisk", "monitor", "--out", "reports/m"]
    assert retrain[: len(monitor)] == monitor and "--retrain" in retrain and "--force" in retrain


def test_cli_job_with_the_real_monitor_on_bad_input_retrains_nothing(tmp_path):
    """`vitalrisk monitor` refuses a missing prediction log (exit 2): the job passes it on."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "team",
            "monitor-job",
            "--",
            "--log",
            str(tmp_path / "missing.sqlite"),
            "--features",
            str(tmp_path / "f.parquet"),
            "--out",
            str(tmp_path / "reports"),
            "--params",
            str(REPO_ROOT / "params.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "VITALRISK_TEAM_DIR": str(tmp_path / "team")},
    )
    assert proc.returncode == 2, proc.stderr
    assert "prediction log not found" in proc.stderr
    assert "nothing retrained" in proc.stderr


def test_systemd_units_verify(tmp_path):
    spec = schedule.ScheduleSpec(
        repo=tmp_path, on_calendar="*-*-* 02:30:00", monitor_args=("--out", "reports/a 100%")
    )
    paths = schedule.write_systemd(spec, tmp_path / "units")
    service = (tmp_path / "units" / "vitalrisk-monitor.service").read_text()
    assert "SuccessExitStatus=10 20 75" in service
    assert "100%%" in service, "'%' must be escaped for systemd"
    assert "EnvironmentFile=-/etc/vitalrisk/secrets.env" in service
    assert (
        "OnCalendar=*-*-* 02:30:00" in (tmp_path / "units" / "vitalrisk-monitor.timer").read_text()
    )
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    args = shlex.split(exec_start.removeprefix("ExecStart=").replace("%%", "%"))
    assert Path(args[0]).is_absolute() and args[1:5] == ["team", "monitor-job", "--team", "--"]
    assert args[5:] == ["--out", "reports/a 100%"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (parsed above)")
    proc = subprocess.run(
        [analyze, "verify", *map(str, paths)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_cron_line_parses_and_runs_the_same_job(tmp_path):
    spec = schedule.ScheduleSpec(
        repo=tmp_path, cron="*/15 6-22 * * 1-5", monitor_args=("--x", "5%")
    )
    text = schedule.cron_entries(spec)
    (line,) = [
        x for x in text.splitlines() if x and not x.startswith("#") and not x.startswith("SHELL=")
    ]
    fields = line.split(None, 5)
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    for value, (lo, hi) in zip(fields[:5], ranges, strict=True):
        for part in value.split(","):
            base = part.split("/")[0]
            if base != "*":
                for bound in base.split("-"):
                    assert lo <= int(bound) <= hi, line
    command = fields[5]
    assert r"5\%" in command and "5%" not in command.replace(r"\%", "")
    assert "monitor-job --team -- --x" in command and command.endswith(
        ">> logs/monitor-job.log 2>&1"
    )


def test_cli_schedule(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "team", "schedule", *args],
            capture_output=True,
            text=True,
            check=False,
        )

    written = run("--systemd", str(tmp_path / "u"), "--repo", str(tmp_path))
    assert written.returncode == 0 and (tmp_path / "u" / "vitalrisk-monitor.timer").is_file()
    bad = run("--cron", "--cron-schedule", "* * *")
    assert bad.returncode == 2 and "five fields" in bad.stderr
