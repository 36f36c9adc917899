"""Processes the team stack starts: detached, one pid file each, stopped only if still ours.

A pid file records the pid *and* the process start time, so a pid reused by an unrelated
process after a reboot or crash is never signalled: ``team down`` stops what ``team up``
started and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PidRecord:
    pid: int
    create_time: float
    cmd: list[str]
    log: str

    def process(self) -> psutil.Process | None:
        """The live process this record describes, or None (gone, zombie, or pid reused)."""
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) > 0.05:
                return None
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None


def pid_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid.json"


def read_pid(run_dir: Path, name: str) -> PidRecord | None:
    path = pid_path(run_dir, name)
    try:
        data = json.loads(path.read_text())
        return PidRecord(int(data["pid"]), float(data["create_time"]), data["cmd"], data["log"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def alive(run_dir: Path, name: str) -> PidRecord | None:
    """The pid record of ``name`` when its process still runs; a stale file is removed."""
    rec = read_pid(run_dir, name)
    if rec is None:
        return None
    if rec.process() is None:
        pid_path(run_dir, name).unlink(missing_ok=True)
        return None
    return rec


def start(
    run_dir: Path,
    name: str,
    cmd: Sequence[str],
    env: Mapping[str, str],
    log_dir: Path,
    user: pwd.struct_passwd | None = None,
) -> PidRecord:
    """Start ``cmd`` in its own session (so stopping it takes its children too)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            **_as_user(user),
        )
    rec = PidRecord(proc.pid, psutil.Process(proc.pid).create_time(), list(cmd), str(log))
    tmp = pid_path(run_dir, name).with_suffix(".tmp")
    tmp.write_text(json.dumps(rec.__dict__))
    os.replace(tmp, pid_path(run_dir, name))
    logger.info("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
    return rec


def stop(
    run_dir: Path,
    name: str,
    sig: signal.Signals = signal.SIGTERM,
    group: bool = True,
    timeout: float = 20.0,
) -> bool:
    """Signal ``name`` (its process group by default), SIGKILL what is left after ``timeout``.

    True if it was running.
    """
    rec = read_pid(run_dir, name)
    proc = rec.process() if rec else None
    if proc is None:
        pid_path(run_dir, name).unlink(missing_ok=True)
        return False
    members = [proc, *proc.children(recursive=True)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    left = _wait_gone(members, timeout)
    for p in left:
        logger.warning(
            "%s: pid %d still running %.0f s after %s, killing", name, p.pid, timeout, sig.name
        )
        with contextlib.suppress(psutil.Error):
            p.kill()
    _wait_gone(left, 5.0)
    pid_path(run_dir, name).unlink(missing_ok=True)
    logger.info("stopped %s (pid %d)", name, proc.pid)
    return True


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(members: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; a zombie counts as exited (some init processes,
    e.g. in containers, never reap orphans). Returns those still running."""
    deadline = time.monotonic() + timeout
    left = [p for p in members if _running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _running(p)]
    return left


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def run_checked(
    cmd: Sequence[str], env: Mapping[str, str], log: Path, user: pwd.struct_passwd | None = None
) -> None:
    """Run a preparation command to completion; its output goes to ``log``; failure raises."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        rc = subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(env),
            check=False,
            **_as_user(user),
        ).returncode
    if rc != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {rc}); see {log}")


def log_tail(path: str | Path, lines: int = 8) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock so two ``team up``/``down`` runs never race on the same state folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
