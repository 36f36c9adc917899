"""``vitalrisk serve``'s process: one listening socket, N worker processes, a clean lifetime.

Why not ``bentoml serve``: its supervisor (circus) waits up to a day for a worker to stop, so a
SIGTERM left the server running and holding the port while one stalled connection stayed
open, and it listens on two unauthenticated local control ports. This one is small:

* it binds the socket once and hands it to every worker (``python -m serving.worker``), which
  run BentoML's worker with the limits of params ``serve``;
* SIGTERM or SIGINT is forwarded (as SIGTERM) to the workers, which stop accepting, finish
  in-flight requests (``shutdown_timeout_seconds``), flush the audit and prediction logs and
  exit; a worker still alive 10 s after that is killed. Only then does the socket close and
  ``run`` return: the port is free when ``vitalrisk serve`` has exited;
* a worker reports over a pipe when it is ready, or why it could not start: a start-up error
  stops everything with that one line (exit 2 from the CLI); a worker that dies after it was
  ready is restarted (``max_worker_restarts_per_minute``, then serving stops with exit 1);
  with one worker, connections wait in the socket's backlog meanwhile;
* workers die with the supervisor (``PR_SET_PDEATHSIG``), so killing it with SIGKILL cannot
  leave an orphan holding the port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from core.errors import UserError

logger = logging.getLogger(__name__)

#: env var naming the file descriptor a worker reports readiness (or its start-up error) on
READY_FD_ENV = "VITALRISK_SUPERVISOR_FD"
#: open files a worker needs besides its connections (model, logs, SQLite, pipes, sockets)
RESERVED_FILES = 256
KILL_GRACE_SECONDS = 10.0


def ensure_open_files(max_connections: int) -> int:
    """Raise the soft open-files limit to fit ``max_connections``; refuse when it cannot."""
    need = max_connections + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise UserError(
            f"serve.max_connections={max_connections} needs about {need} open files, but the "
            f"limit is {hard} (ulimit -Hn): lower serve.max_connections or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    ready_fd: int
    ready: bool = False
    message: bytes = b""


@dataclass
class Supervisor:
    """Run ``workers`` worker processes on ``host:port`` until a signal or a fatal error."""

    host: str
    port: int
    workers: int
    params: str | None
    env: dict[str, str]
    shutdown_timeout: float
    max_restarts_per_minute: int
    _pool: dict[int, Worker] = field(default_factory=dict)
    _restarts: deque[float] = field(default_factory=deque)
    _stop_signal: int | None = None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (0), a crash loop (1); ``UserError`` on a start-up error."""
        sock = listen(self.host, self.port)
        metrics_dir = tempfile.mkdtemp(prefix="vitalrisk-metrics-")
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ)
        try:
            for i in range(1, self.workers + 1):
                self._spawn(i, sock, metrics_dir, sel)
            return self._loop(sock, metrics_dir, sel, wake_r)
        finally:
            self._stop_all()
            for s, handler in old.items():
                signal.signal(s, handler)
            signal.set_wakeup_fd(old_wakeup)
            sel.close()
            for fd in (wake_r, wake_w, *(w.ready_fd for w in self._pool.values())):
                with contextlib.suppress(OSError):
                    os.close(fd)
            sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            logger.info("vitalrisk serve stopped; %s:%d is free", self.host, self.port)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def _spawn(self, index: int, sock: socket.socket, metrics_dir: str, sel: Any) -> None:
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        env = {
            **self.env,
            READY_FD_ENV: str(ready_w),
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            "BENTOML_RUNNER_MAP": json.dumps({"vitalrisk": f"http://{self.host}:{self.port}"}),
        }
        cmd = [
            sys.executable,
            "-m",
            "serving.worker",
            "--fd",
            str(sock.fileno()),
            "--worker-id",
            str(index),
            "--parent",
            str(os.getpid()),
        ]
        if self.params:
            cmd += ["--params", self.params]
        proc = subprocess.Popen(cmd, env=env, pass_fds=(sock.fileno(), ready_w), close_fds=True)
        os.close(ready_w)
        self._pool[index] = Worker(index, proc, ready_r)
        sel.register(ready_r, selectors.EVENT_READ, index)

    def _loop(self, sock: socket.socket, metrics_dir: str, sel: Any, wake_r: int) -> int:
        announced = False
        while self._stop_signal is None:
            for key, _ in sel.select(timeout=0.5):
                if key.fd == wake_r:
                    with contextlib.suppress(OSError):
                        os.read(wake_r, 512)
                else:
                    self._read_ready(self._pool[key.data], sel)
            for w in list(self._pool.values()):
                rc = w.proc.poll()
                if rc is None:
                    continue
                self._read_ready(w, sel)
                if not w.ready:
                    raise UserError(self._startup_error(w, rc))
                if not self._may_restart():
                    logger.error(
                        "worker %d exited (%s); more than %d restarts within a minute: stopping",
                        w.index,
                        _exit_text(rc),
                        self.max_restarts_per_minute,
                    )
                    return 1
                logger.error("worker %d exited (%s); restarting it", w.index, _exit_text(rc))
                if w.ready_fd in sel.get_map():
                    sel.unregister(w.ready_fd)
                os.close(w.ready_fd)
                del self._pool[w.index]
                self._spawn(w.index, sock, metrics_dir, sel)
            if not announced and self._pool and all(w.ready for w in self._pool.values()):
                announced = True
                logger.info(
                    "vitalrisk serving on http://%s:%d (%d worker(s), pid %d)",
                    self.host,
                    self.port,
                    len(self._pool),
                    os.getpid(),
                )
        logger.info("signal %d: stopping the workers", self._stop_signal)
        return 0

    def _read_ready(self, w: Worker, sel: Any) -> None:
        """Collect what the worker reported; at end of file stop watching its pipe (an
        closed pipe is always readable: watching it would spin)."""
        eof = False
        try:
            while True:
                chunk = os.read(w.ready_fd, 4096)
                if not chunk:
                    eof = True
                    break
                w.message += chunk
        except (BlockingIOError, OSError):
            pass
        if eof and w.ready_fd in sel.get_map():
            sel.unregister(w.ready_fd)
        if w.message.startswith(b"ready"):
            w.ready = True

    def _startup_error(self, w: Worker, rc: int) -> str:
        text = w.message.decode("utf-8", "replace").strip()
        if text.startswith("error:"):
            return text.removeprefix("error:").strip()
        return (
            f"the service did not start: worker {w.index} exited ({_exit_text(rc)}) before it "
            "was ready (the log above says why)"
        )

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > 60:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts_per_minute:
            return False
        self._restarts.append(now)
        return True

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait for graceful stops, then SIGKILL what is left."""
        live = [w for w in self._pool.values() if w.proc.poll() is None]
        for w in live:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout + KILL_GRACE_SECONDS
        for w in live:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("worker %d did not stop in time: killing it", w.index)
                w.proc.kill()
                w.proc.wait(timeout=10)


def _exit_text(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-rc).name}"
    return f"exit code {rc}"


def notify(message: str) -> None:
    """Worker side: tell the supervisor ``ready`` or ``error: <why>`` (no-op unsupervised)."""
    fd = os.environ.get(READY_FD_ENV)
    if not fd:
        return
    with contextlib.suppress(OSError, ValueError):
        os.write(int(fd), message.encode("utf-8", "replace")[:4000])
        os.close(int(fd))
    os.environ.pop(READY_FD_ENV, None)


def supervised() -> bool:
    return bool(os.environ.get(READY_FD_ENV))
