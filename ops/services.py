"""The services of the team stack, one class each, registered in :data:`SERVICES` (start order).

Each service knows how to probe its URL from the settings (a real protocol exchange, not just
an open port), whether it may start one itself (only for a local URL, only from an installed
binary) and what to prepare once it answers (database, bucket). A service that already answers
on its URL is used as it is and never stopped by ``team down``.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from ops import procs
from ops.settings import TeamSettings, host_port

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What every service needs: settings, the child environment and the state folders."""

    settings: TeamSettings
    env: Mapping[str, str]
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.settings.state_dir

    @property
    def run_dir(self) -> Path:
        return self.state / "run"

    @property
    def log_dir(self) -> Path:
        return self.state / "logs"


@dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str


class Service:
    name: ClassVar[str]
    default_port: ClassVar[int]
    start_timeout: ClassVar[float] = 30.0
    #: services that must answer before this one starts
    needs: ClassVar[tuple[str, ...]] = ()
    #: the URL's port is this service's own (a worker connects to the scheduler's)
    owns_port: ClassVar[bool] = True

    def url(self, ctx: Context) -> str:
        raise NotImplementedError

    def address(self, ctx: Context) -> tuple[str, int]:
        return host_port(self.url(ctx), self.default_port)

    def local(self, ctx: Context) -> bool:
        return ctx.settings.is_local(self.url(ctx))

    def probe(self, ctx: Context) -> Probe:
        raise NotImplementedError

    def command(self, ctx: Context) -> list[str]:
        raise NotImplementedError

    def missing(self, ctx: Context) -> str | None:
        """Why this service cannot be started here (binary not installed), else None."""
        return None

    def prepare(self, ctx: Context) -> None:
        """Before the first start (config files, data directories)."""

    def ensure(self, ctx: Context) -> str | None:
        """Once it answers, whoever runs it: create what the stack needs; a note or None."""
        return None

    def start(self, ctx: Context) -> procs.PidRecord:
        self.prepare(ctx)
        return procs.start(ctx.run_dir, self.name, self.command(ctx), ctx.env, ctx.log_dir)

    def stop(self, ctx: Context) -> bool:
        return procs.stop(ctx.run_dir, self.name)


def _binary(name: str, *extra_dirs: str) -> str | None:
    venv_bin = Path(sys.executable).parent
    for d in (str(venv_bin), *extra_dirs):
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which(name)


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


# -- PostgreSQL ---------------------------------------------------------------------------------


def pg_maintenance_url(url: str) -> str:
    """The same server and user, database ``postgres`` (to create the MLflow database)."""
    return urlunsplit(urlsplit(url)._replace(path="/postgres", query=""))


def host_port_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` with the psycopg (3) driver named, as MLflow's SQLAlchemy needs it."""
    scheme, rest = url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else url


def pg_database(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "postgres"


class Postgres(Service):
    name = "postgres"
    default_port = 5432
    start_timeout = 60.0

    def url(self, ctx: Context) -> str:
        return ctx.settings.pg_url

    def probe(self, ctx: Context) -> Probe:
        import psycopg

        try:
            with psycopg.connect(pg_maintenance_url(self.url(ctx)), connect_timeout=2) as conn:
                version = conn.execute("SHOW server_version").fetchone()
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return Probe(False, first)
        return Probe(True, f"PostgreSQL {version[0] if version else '?'}")

    def _bin_dir(self) -> Path | None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_version_key)
        if found:
            return Path(found[-1]).parent
        exe = shutil.which("postgres")
        return Path(exe).resolve().parent if exe else None

    def missing(self, ctx: Context) -> str | None:
        if self._bin_dir() is None:
            return "PostgreSQL server binaries not found (Debian: apt-get install postgresql)"
        if os.geteuid() == 0 and _run_as() is None:
            return "running as root and there is no 'postgres' user to run the server as"
        return None

    def _data(self, ctx: Context) -> Path:
        return ctx.state / "postgres" / "data"

    def prepare(self, ctx: Context) -> None:
        data, sock = self._data(ctx), ctx.state / "postgres" / "run"
        sock.mkdir(parents=True, exist_ok=True)
        user = _run_as()
        if (data / "PG_VERSION").is_file():
            return
        data.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _check_traversable(data.parent.parent, user)
            for p in (data.parent, data, sock):
                os.chown(p, user.pw_uid, user.pw_gid)
        bin_dir = self._bin_dir()
        assert bin_dir is not None
        db_user = urlsplit(self.url(ctx)).username or pwd.getpwuid(os.getuid()).pw_name
        cmd = [str(bin_dir / "initdb"), "-D", str(data), "-U", db_user, "-E", "UTF8"]
        cmd += ["--no-locale", "--auth-local=trust"]
        password = ctx.env.get("PGPASSWORD")
        pwfile = ctx.state / "postgres" / ".pwfile"
        if password:
            pwfile.write_text(password)
            pwfile.chmod(0o600)
            if user is not None:
                os.chown(pwfile, user.pw_uid, user.pw_gid)
            cmd += ["--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            logger.warning("PGPASSWORD not set: own PostgreSQL trusts loopback connections")
            cmd += ["--auth-host=trust"]
        try:
            procs.run_checked(cmd, ctx.env, ctx.log_dir / "postgres-initdb.log", user)
        finally:
            pwfile.unlink(missing_ok=True)

    def command(self, ctx: Context) -> list[str]:
        host, port = self.address(ctx)
        bin_dir = self._bin_dir()
        assert bin_dir is not None
        return [
            str(bin_dir / "postgres"),
            "-D",
            str(self._data(ctx)),
            "-c",
            f"listen_addresses={host}",
            "-p",
            str(port),
            "-k",
            str(ctx.state / "postgres" / "run"),
        ]

    def start(self, ctx: Context) -> procs.PidRecord:
        self.prepare(ctx)
        return procs.start(
            ctx.run_dir, self.name, self.command(ctx), ctx.env, ctx.log_dir, user=_run_as()
        )

    def stop(self, ctx: Context) -> bool:
        # SIGINT = "fast shutdown": the postmaster ends its backends and checkpoints
        return procs.stop(ctx.run_dir, self.name, sig=signal.SIGINT, group=False, timeout=60)

    def ensure(self, ctx: Context) -> str | None:
        import psycopg
        from psycopg import sql

        # MLflow's database, and the serving replicas' one when it lives on this server
        urls = [self.url(ctx)]
        serve = ctx.settings.serve_db_url
        if host_port_of(serve) == host_port_of(self.url(ctx)):
            urls.append(serve)
        said = []
        with psycopg.connect(
            pg_maintenance_url(self.url(ctx)), connect_timeout=5, autocommit=True
        ) as conn:
            for db in dict.fromkeys(pg_database(u) for u in urls):
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                    said.append(f"database {db}")
                    continue
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
                said.append(f"database {db} created")
        return ", ".join(said)


def _version_key(path: str) -> tuple[int, ...]:
    parts = Path(path).parts
    try:
        return (int(parts[-3]),)
    except (ValueError, IndexError):
        return (0,)


def _check_traversable(path: Path, user: pwd.struct_passwd) -> None:
    """The server user must reach its data directory through every parent folder."""
    for d in [path, *path.parents]:
        st = d.stat()
        ok = st.st_mode & 0o001 or (st.st_gid == user.pw_gid and st.st_mode & 0o010)
        if not ok and st.st_uid != user.pw_uid:
            raise RuntimeError(
                f"user {user.pw_name} cannot enter {d} (mode {st.st_mode & 0o777:o}): choose a "
                f"VITALRISK_TEAM_DIR it can reach, or run team up as an ordinary user"
            )


def _run_as() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` account."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


# -- S3-compatible object store -----------------------------------------------------------------


def s3_client(settings: TeamSettings, env: Mapping[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=env.get("AWS_SESSION_TOKEN"),
    )


class ObjectStore(Service):
    """S3 API. Locally the moto server: an in-memory stand-in (contents go with ``team down``)."""

    name = "s3"
    default_port = 9000

    def url(self, ctx: Context) -> str:
        return ctx.settings.s3_endpoint_url

    def probe(self, ctx: Context) -> Probe:
        status = _http_status(self.url(ctx))
        if status is None or status >= 500:
            return Probe(False, "no S3 endpoint answers" if status is None else f"HTTP {status}")
        return Probe(True, f"S3 API (HTTP {status})")

    def missing(self, ctx: Context) -> str | None:
        return None if _binary("moto_server") else "moto_server not installed (pip: moto[server])"

    def command(self, ctx: Context) -> list[str]:
        host, port = self.address(ctx)
        exe = _binary("moto_server")
        assert exe is not None
        return [exe, "-H", host, "-p", str(port)]

    def ensure(self, ctx: Context) -> str | None:
        from botocore.exceptions import ClientError

        s3 = s3_client(ctx.settings, ctx.env)
        bucket = ctx.settings.s3_bucket
        try:
            s3.head_bucket(Bucket=bucket)
            return f"bucket {bucket}"
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
        s3.create_bucket(Bucket=bucket)
        return f"bucket {bucket} created"


# -- Redis and MQTT: use the machine's when they answer ------------------------------------------


class Redis(Service):
    name = "redis"
    default_port = 6379

    def url(self, ctx: Context) -> str:
        return ctx.settings.redis_url

    def probe(self, ctx: Context) -> Probe:
        host, port = self.address(ctx)
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                s.settimeout(1.0)
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                reply = s.recv(64)
        except OSError as exc:
            return Probe(False, f"no Redis answers ({exc.strerror or exc})")
        if reply.startswith(b"+PONG"):
            return Probe(True, "Redis PONG")
        if reply.startswith(b"-NOAUTH"):
            return Probe(True, "Redis (password required)")
        return Probe(False, f"not Redis: {reply[:30]!r}")

    def missing(self, ctx: Context) -> str | None:
        if _binary("redis-server"):
            return None
        return "redis-server not installed (Debian: apt-get install redis-server)"

    def command(self, ctx: Context) -> list[str]:
        host, port = self.address(ctx)
        data = ctx.state / "redis"
        data.mkdir(parents=True, exist_ok=True)
        exe = _binary("redis-server")
        assert exe is not None
        # no persistence options: Redis holds rate-limit counters only
        return [exe, "--bind", host, "--port", str(port), "--dir", str(data)]


MQTT_CONNECT = bytes.fromhex("100c00044d5154540402003c0000")  # MQTT 3.1.1 CONNECT, clean
MQTT_DISCONNECT = bytes.fromhex("e000")


def mosquitto_conf(host: str, port: int, data_dir: Path) -> str:
    """The broker settings team mode needs (also what a production broker must be given)."""
    return f"""# generated by `vitalrisk team up`: the local MQTT broker of team mode
# production: TLS listener, password_file or certificates, ACLs per device topic
listener {port} {host}
allow_anonymous true
persistence true
persistence_location {data_dir}/
# a collector that restarts must find every message published while it was down
# (mosquitto's default keeps 1,000 per offline session and drops the rest)
max_queued_messages 1000000
max_queued_bytes 0
# MQTT 3.1.1 clients: in-flight window (v5 clients announce their own receive maximum)
max_inflight_messages 1000
set_tcp_nodelay true
log_type error
log_type warning
log_type notice
"""


def mosquitto_binary() -> str | None:
    return _binary("mosquitto", "/usr/sbin")


class Mqtt(Service):
    name = "mqtt"
    default_port = 1883

    def url(self, ctx: Context) -> str:
        return ctx.settings.mqtt_url

    def probe(self, ctx: Context) -> Probe:
        host, port = self.address(ctx)
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                s.settimeout(2.0)
                s.sendall(MQTT_CONNECT)
                reply = s.recv(4)
                s.sendall(MQTT_DISCONNECT)
        except OSError as exc:
            return Probe(False, f"no MQTT broker answers ({exc.strerror or exc})")
        if reply[:1] == b"\x20" and reply[3:4] == b"\x00":
            return Probe(True, "MQTT CONNACK")
        if reply[:1] == b"\x20":
            return Probe(True, f"MQTT broker (refused anonymous: code {reply[3:4].hex()})")
        return Probe(False, f"not an MQTT broker: {reply!r}")

    def missing(self, ctx: Context) -> str | None:
        if mosquitto_binary():
            return None
        return "mosquitto not installed (Debian: apt-get install mosquitto)"

    def prepare(self, ctx: Context) -> None:
        host, port = self.address(ctx)
        d = ctx.state / "mosquitto"
        d.mkdir(parents=True, exist_ok=True)
        (d / "mosquitto.conf").write_text(mosquitto_conf(host, port, d))

    def command(self, ctx: Context) -> list[str]:
        exe = mosquitto_binary()
        assert exe is not None
        return [exe, "-c", str(ctx.state / "mosquitto" / "mosquitto.conf")]


# -- MLflow tracking server ---------------------------------------------------------------------


class MlflowServer(Service):
    """Backend store in PostgreSQL, artifacts proxied into the object store."""

    name = "mlflow"
    default_port = 5000
    start_timeout = 180.0  # a new database runs MLflow's migrations first (~30 s on 2 cores)
    needs = ("postgres", "s3")

    def url(self, ctx: Context) -> str:
        return ctx.settings.mlflow_url

    def probe(self, ctx: Context) -> Probe:
        status = _http_status(self.url(ctx).rstrip("/") + "/health")
        if status == 200:
            return Probe(True, "MLflow /health OK")
        return Probe(False, "no MLflow server answers" if status is None else f"HTTP {status}")

    def command(self, ctx: Context) -> list[str]:
        host, port = self.address(ctx)
        s = ctx.settings
        return [
            _binary("mlflow") or "mlflow",
            "server",
            "--backend-store-uri",
            sqlalchemy_url(s.pg_url),
            "--artifacts-destination",
            s.mlflow_artifacts,
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(s.mlflow_workers),
        ]


# -- Dask ---------------------------------------------------------------------------------------


def dask_workers(ctx: Context) -> set[str] | None:
    """Names of the workers the scheduler knows (cached per command), None if it is down."""
    if "dask" not in ctx.cache:
        host, port = host_port(ctx.settings.dask_scheduler, 8786)
        if not procs.port_open(host, port):
            ctx.cache["dask"] = None
        else:
            from distributed import Client

            try:
                with Client(ctx.settings.dask_scheduler, timeout="5s") as client:
                    info = client.scheduler_info(n_workers=-1)
                ctx.cache["dask"] = {w.get("name", "") for w in info["workers"].values()}
            except (OSError, TimeoutError):
                ctx.cache["dask"] = None
    found: set[str] | None = ctx.cache["dask"]
    return found


class DaskScheduler(Service):
    name = "dask-scheduler"
    default_port = 8786

    def url(self, ctx: Context) -> str:
        return ctx.settings.dask_scheduler

    def probe(self, ctx: Context) -> Probe:
        ctx.cache.pop("dask", None)
        names = dask_workers(ctx)
        if names is None:
            return Probe(False, "no Dask scheduler answers")
        return Probe(True, f"Dask scheduler, {len(names)} worker(s)")

    def command(self, ctx: Context) -> list[str]:
        host, port = self.address(ctx)
        exe = _binary("dask") or "dask"
        return [exe, "scheduler", "--host", host, "--port", str(port), "--no-dashboard"]


class DaskWorker(Service):
    """One worker process (one thread): the stack runs ``dask_workers`` of them."""

    default_port = 8786
    start_timeout = 60.0
    needs = ("dask-scheduler",)
    owns_port = False

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"dask-worker-{index}"  # type: ignore[misc]

    @property
    def worker_name(self) -> str:
        return f"vitalrisk-team-w{self.index}"

    def url(self, ctx: Context) -> str:
        return ctx.settings.dask_scheduler

    def probe(self, ctx: Context) -> Probe:
        ctx.cache.pop("dask", None)
        names = dask_workers(ctx)
        if names is None:
            return Probe(False, "scheduler not answering")
        if self.worker_name in names:
            return Probe(True, f"registered as {self.worker_name}")
        return Probe(False, f"{self.worker_name} not registered with the scheduler")

    def command(self, ctx: Context) -> list[str]:
        s = ctx.settings
        local = ctx.state / "dask" / self.worker_name
        local.mkdir(parents=True, exist_ok=True)
        return [
            _binary("dask") or "dask",
            "worker",
            s.dask_scheduler,
            "--name",
            self.worker_name,
            "--nthreads",
            "1",
            "--memory-limit",
            s.dask_worker_memory,
            "--local-directory",
            str(local),
            "--no-dashboard",
        ]


#: every service of the stack, in start order (``team down`` stops in reverse)
SERVICES: list[Service] = [
    Postgres(),
    ObjectStore(),
    Redis(),
    Mqtt(),
    MlflowServer(),
    DaskScheduler(),
]


def services(settings: TeamSettings) -> list[Service]:
    """The registered services plus ``dask_workers`` worker processes."""
    return [*SERVICES, *(DaskWorker(i) for i in range(1, settings.dask_workers + 1))]
