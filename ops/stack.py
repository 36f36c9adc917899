"""``team up`` / ``down`` / ``status``: the local team stack as plain processes.

Idempotent by construction: ``up`` first probes each service's URL and starts only what does
not answer (and may be started here: a local URL and an installed binary); ``down`` stops only
processes whose pid file this state folder holds and that are still the process it started.
Services that were already running (the machine's PostgreSQL, Redis, Mosquitto) or that live
elsewhere (real S3, a hospital MLflow) are used as they are and never stopped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ops import procs
from ops.services import Context, Service, services
from ops.settings import TeamSettings, client_env

logger = logging.getLogger(__name__)

DVC_REMOTE = "team"
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "True",
}


@dataclass
class ServiceStatus:
    name: str
    url: str
    #: managed (started here) | external (already running locally) | remote | stopped |
    #: unhealthy (ours but not answering) | failed (could not start)
    state: str
    healthy: bool
    pid: int | None = None
    detail: str = ""


@dataclass
class StackResult:
    services: list[ServiceStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.healthy for s in self.services)


def child_env(settings: TeamSettings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every process the stack starts (and of team-mode clients)."""
    base = dict(os.environ if environ is None else environ)
    return {**base, **TELEMETRY_OFF, **client_env(settings, base)}


def context(settings: TeamSettings, environ: Mapping[str, str] | None = None) -> Context:
    return Context(settings=settings, env=child_env(settings, environ))


def _select(settings: TeamSettings, only: Sequence[str] | None) -> list[Service]:
    all_services = services(settings)
    if not only:
        return all_services
    known = {s.name for s in all_services}
    unknown = sorted(set(only) - known)
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}: expected some of {sorted(known)}")
    return [s for s in all_services if s.name in only]


def _status_of(svc: Service, ctx: Context) -> ServiceStatus:
    rec = procs.alive(ctx.run_dir, svc.name)
    pr = svc.probe(ctx)
    if rec is not None:
        state = "managed" if pr.ok else "unhealthy"
    elif pr.ok:
        state = "external" if svc.local(ctx) else "remote"
    else:
        state = "stopped"
    return ServiceStatus(svc.name, svc.url(ctx), state, pr.ok, rec.pid if rec else None, pr.detail)


def status(settings: TeamSettings, only: Sequence[str] | None = None) -> StackResult:
    ctx = context(settings)
    return StackResult([_status_of(s, ctx) for s in _select(settings, only)])


def _wait_healthy(svc: Service, ctx: Context, rec: procs.PidRecord | None) -> str | None:
    """None once the service answers; else why not (its process died, or the timeout)."""
    deadline = time.monotonic() + svc.start_timeout
    while time.monotonic() < deadline:
        if svc.probe(ctx).ok:
            return None
        if rec is not None and rec.process() is None:
            tail = procs.log_tail(rec.log)
            return f"{svc.name} exited during start-up; last lines of {rec.log}:\n{tail}"
        time.sleep(0.3)
    return f"{svc.name} did not answer at {svc.url(ctx)} within {svc.start_timeout:.0f} s" + (
        f"; see {rec.log}" if rec else ""
    )


def _bring_up(svc: Service, ctx: Context, ready: Callable[[str], bool]) -> str | None:
    """Start ``svc`` unless it answers already; a problem message or None."""
    st = _status_of(svc, ctx)
    if st.healthy:
        return None
    url = svc.url(ctx)
    rec = procs.alive(ctx.run_dir, svc.name)
    if rec is not None:  # ours and still starting (or hung)
        return _wait_healthy(svc, ctx, rec)
    if not svc.local(ctx):
        return f"{svc.name}: {url} does not answer ({st.detail}); it is not local, so not started"
    host, port = svc.address(ctx)
    if svc.owns_port and procs.port_open(host, port):
        return f"{svc.name}: port {port} on {host} is in use by a program that is not {svc.name} ({st.detail})"
    reason = svc.missing(ctx)
    if reason:
        return f"{svc.name}: nothing answers at {url} and it cannot be started here: {reason}"
    waiting = [n for n in svc.needs if not ready(n)]
    if waiting:
        return f"{svc.name}: not started because {', '.join(waiting)} is not running"
    try:
        rec = svc.start(ctx)
    except (OSError, RuntimeError) as exc:
        return f"{svc.name}: could not start: {exc}"
    return _wait_healthy(svc, ctx, rec)


def up(
    settings: TeamSettings,
    only: Sequence[str] | None = None,
    dvc_repo: Path | None = None,
) -> StackResult:
    """Start what is missing, prepare databases and buckets, and report every service.

    Services start concurrently, each once the services it needs answer and are prepared
    (MLflow's migrations need not wait for Dask, nor Dask for MLflow).
    """
    ctx = context(settings)
    selected = _select(settings, only)
    by_name = {s.name: s for s in services(settings)}
    done = {s.name: threading.Event() for s in selected}
    healthy: set[str] = set()

    def ready(name: str) -> bool:
        if name in done:
            done[name].wait()
            return name in healthy
        return by_name[name].probe(ctx).ok  # not selected: only check that it answers

    def bring(svc: Service) -> tuple[ServiceStatus, str | None]:
        try:
            problem, note = _bring_up(svc, ctx, ready), None
            if problem is None:
                try:
                    note = svc.ensure(ctx)
                    healthy.add(svc.name)
                except Exception as exc:  # a refused CREATE DATABASE, a denied bucket, ...
                    problem = f"{svc.name}: running, but preparing it failed: {exc}"
        finally:
            done[svc.name].set()
        st = _status_of(svc, ctx)
        if note:
            st.detail = f"{st.detail}; {note}"
        return st, problem

    result = StackResult()
    with procs.locked(ctx.state / "lock"), ThreadPoolExecutor(len(selected)) as pool:
        for st, problem in pool.map(bring, selected):
            result.services.append(st)
            if problem:
                logger.error("%s", problem)
                result.problems.append(problem)
    if dvc_repo is not None and "s3" in healthy:
        result.problems.extend(configure_dvc_remote(dvc_repo, settings))
    return result


def down(settings: TeamSettings, only: Sequence[str] | None = None) -> list[str]:
    """Stop the processes this state folder started; their names.

    In waves: a service stops once everything that needs it has stopped (workers before the
    scheduler, MLflow before PostgreSQL); the services of a wave stop concurrently.
    """
    ctx = context(settings)
    by_name = {s.name: s for s in services(settings)}
    started = sorted(p.name.removesuffix(".pid.json") for p in ctx.run_dir.glob("*.pid.json"))
    left = [n for n in started if not only or n in only]
    stopped: list[str] = []

    def stop(name: str) -> bool:
        svc = by_name.get(name)
        return svc.stop(ctx) if svc else procs.stop(ctx.run_dir, name)

    with procs.locked(ctx.state / "lock"), ThreadPoolExecutor(max(1, len(left))) as pool:
        while left:
            needed = {n for m in left if m in by_name for n in by_name[m].needs}
            wave = [n for n in left if n not in needed] or left
            for name, was_running in zip(wave, pool.map(stop, wave), strict=True):
                if was_running:
                    stopped.append(name)
            left = [n for n in left if n not in wave]
    return stopped


def configure_dvc_remote(repo: Path, settings: TeamSettings) -> list[str]:
    """Point the repository's ``team`` DVC remote at the settings' endpoint (``config.local``).

    The remote itself (``s3://<bucket>/dvc``) is declared in the committed ``.dvc/config``;
    only the endpoint and region, which differ between a laptop and a deployment, go into the
    git-ignored ``.dvc/config.local`` (DVC's own INI format, written with DVC's configobj).
    """
    from configobj import ConfigObj

    section = f'remote "{DVC_REMOTE}"'
    committed = repo / ".dvc" / "config"
    if not committed.is_file():
        return [f"{repo}: not a DVC repository (no .dvc/config); DVC remote not configured"]
    if section not in ConfigObj(str(committed)):
        return [f"{committed}: no remote {DVC_REMOTE!r} defined; DVC remote not configured"]
    local = ConfigObj(str(repo / ".dvc" / "config.local"))
    local.setdefault(section, {})
    local[section]["endpointurl"] = settings.s3_endpoint_url
    local[section]["region"] = settings.s3_region
    local.write()
    return []
