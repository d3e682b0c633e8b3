"""Real PostgreSQL and MariaDB servers for the tests, started from Debian's binaries.

Each server runs from its own folder, listens on 127.0.0.1 only, on a free port, and is
stopped (and its folder removed) at the end of the session, or at exit if pytest dies.
The servers refuse to run as root, so as root they run as ``postgres`` / ``mysql``.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.gateway_process import free_port

PG_USER = "postgres"
MYSQL_USER = "mes"
MYSQL_PASSWORD = "mes-test-pw"


class ServerUnavailable(RuntimeError):
    """The server's binaries are missing, or it would not start."""


def _as_service_user(user: str, command: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *command] if os.geteuid() == 0 else command


def _own(path: Path, user: str) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user, user)
        for child in path.rglob("*"):
            shutil.chown(child, user, user)


def _wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerUnavailable(f"server on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerUnavailable(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise ServerUnavailable(f"{' '.join(command[:3])}... failed: {result.stderr.strip()}")
    return result  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ServerTLS:
    """A server's TLS: its certificate and key, and the CA it takes client certificates
    from. Such a server refuses every TCP connection without TLS."""

    cert: Path
    key: Path
    client_ca: Path


@dataclass
class DatabaseServer:
    kind: str  # "postgresql" or "mysql"
    base: Path
    port: int
    user: str
    password: str
    binaries: Path
    # Durable: a commit acknowledged is a commit kept through a crash (the servers' defaults).
    # Not durable (the default here): faster tests, at the cost of the last commits on a crash.
    durable: bool = False
    # MariaDB's buffer pool: its default, enough for the tests; benchmarks of large
    # histories give it room for their data, as a deployment would.
    buffer_pool: str = "128M"
    tls: ServerTLS | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    host = "127.0.0.1"

    def url(self, database: str) -> str:
        if self.kind == "postgresql":
            return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{database}"
        return (
            f"mysql+aiomysql://{self.user}:{self.password}@{self.host}:{self.port}/"
            f"{database}?charset=utf8mb4"
        )

    def new_database_name(self, prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:10]}"

    def sql(self, statement: str, database: str | None = None) -> str:
        """Run one statement with the command-line client; its output."""
        if self.kind == "postgresql":
            command = [
                str(self.binaries / "psql"),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database or "postgres",
                "-tAc",
                statement,
            ]
        else:
            command = [
                "mariadb",
                "-h",
                self.host,
                "-P",
                str(self.port),
                "-u",
                self.user,
                f"-p{self.password}",
                "-N",
                "-e",
                statement,
            ]
            if self.tls is not None:
                command.insert(1, "--ssl")
            if database:
                command.insert(1, f"--database={database}")
        return _run(command, timeout=60).stdout

    def drop_database(self, name: str) -> None:
        if not self.is_running():
            return
        if self.kind == "postgresql":
            self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            self.sql(f"DROP DATABASE IF EXISTS `{name}`")

    def is_running(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self) -> None:
        if self.kind == "postgresql":
            _run(
                _as_service_user(
                    PG_USER,
                    [
                        str(self.binaries / "pg_ctl"),
                        "-D",
                        str(self.base / "data"),
                        "-l",
                        str(self.base / "server.log"),
                        "-w",
                        "-t",
                        "60",
                        "-o",
                        f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                        + ("" if self.durable else "-c fsync=off -c synchronous_commit=off ")
                        + "-c max_connections=300"
                        + self._postgres_tls_options(),
                        "start",
                    ],
                ),
                timeout=90,
            )
        else:
            log = open(self.base / "server.log", "ab")
            self.process = subprocess.Popen(
                [
                    str(self.binaries / "mariadbd"),
                    "--no-defaults",
                    "--user=mysql",
                    f"--datadir={self.base / 'data'}",
                    f"--socket={self.base / 'sock'}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    "--skip-name-resolve",
                    f"--pid-file={self.base / 'mariadb.pid'}",
                    f"--innodb-buffer-pool-size={self.buffer_pool}",
                    f"--innodb-flush-log-at-trx-commit={1 if self.durable else 2}",
                    "--max-connections=500",
                    "--character-set-server=utf8mb4",
                    "--collation-server=utf8mb4_unicode_ci",
                    *self._mariadb_tls_options(),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
        _wait_for_port(self.port, 60, self.process)

    def _postgres_tls_options(self) -> str:
        if self.tls is None:
            return ""
        return (
            f" -c ssl=on -c ssl_cert_file={self.tls.cert} -c ssl_key_file={self.tls.key}"
            f" -c ssl_ca_file={self.tls.client_ca}"
        )

    def _mariadb_tls_options(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            f"--ssl-cert={self.tls.cert}",
            f"--ssl-key={self.tls.key}",
            f"--ssl-ca={self.tls.client_ca}",
            "--require-secure-transport=ON",
        ]

    def stop(self, how: str = "fast") -> None:
        """``fast`` (clean), ``immediate`` (PostgreSQL's crash-like stop) or ``kill`` (SIGKILL)."""
        if self.kind == "postgresql":
            if how == "kill":
                pid = int((self.base / "data" / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                self._wait_closed()
                return
            _run(
                _as_service_user(
                    PG_USER,
                    [
                        str(self.binaries / "pg_ctl"),
                        "-D",
                        str(self.base / "data"),
                        "-w",
                        "-m",
                        "immediate" if how == "immediate" else "fast",
                        "stop",
                    ],
                ),
                timeout=60,
            )
            return
        if self.process is None:
            return
        self.process.send_signal(signal.SIGKILL if how in ("kill", "immediate") else signal.SIGTERM)
        self.process.wait(60)
        self.process = None
        self._wait_closed()

    def _wait_closed(self) -> None:
        deadline = time.monotonic() + 30
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)

    def shutdown(self) -> None:
        try:
            if self.is_running() or self.process is not None:
                self.stop("fast")
        except (ServerUnavailable, subprocess.TimeoutExpired, OSError):
            self.stop("kill")
        shutil.rmtree(self.base, ignore_errors=True)


def _postgres_binaries() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4])
    )
    if not found:
        raise ServerUnavailable("PostgreSQL server binaries not found (apt-get install postgresql)")
    return Path(found[-1]).parent


def _mariadb_binaries() -> Path:
    for folder in ("/usr/sbin", "/usr/bin", "/usr/local/bin"):
        if Path(folder, "mariadbd").exists():
            return Path(folder)
    raise ServerUnavailable("MariaDB server binaries not found (apt-get install mariadb-server)")


def _install_tls(base: Path, tls: ServerTLS, user: str) -> ServerTLS:
    """The server's copies of its TLS files, which it can read and nobody else can."""
    folder = base / "tls"
    folder.mkdir()
    copies = ServerTLS(*(folder / name for name in ("server.pem", "server.key", "client-ca.pem")))
    for source, copy in zip(
        (tls.cert, tls.key, tls.client_ca), (copies.cert, copies.key, copies.client_ca), strict=True
    ):
        shutil.copyfile(source, copy)
        copy.chmod(0o600)
    _own(folder, user)
    if os.geteuid() == 0:
        shutil.chown(folder, user, user)
    return copies


def start_postgres(
    base: Path, durable: bool = False, tls: ServerTLS | None = None
) -> DatabaseServer:
    binaries = _postgres_binaries()
    base.mkdir(parents=True, exist_ok=True)
    _own(base, PG_USER)
    _run(
        _as_service_user(
            PG_USER,
            [
                str(binaries / "initdb"),
                "-D",
                str(base / "data"),
                "--auth=trust",
                "-U",
                PG_USER,
                "-E",
                "UTF8",
            ],
        ),
        timeout=120,
    )
    server = DatabaseServer("postgresql", base, free_port(), PG_USER, "", binaries, durable)
    if tls is not None:
        server.tls = _install_tls(base, tls, PG_USER)
        # TCP only with TLS; a client certificate authenticates the user it names.
        (base / "data" / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all certuser 127.0.0.1/32 cert\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostnossl all all 127.0.0.1/32 reject\n"
        )
    server.start()
    atexit.register(server.shutdown)
    return server


def start_postgres_standby(primary: DatabaseServer, base: Path) -> DatabaseServer:
    """A hot standby of ``primary``, as deployments run read replicas: a base backup taken
    over the replication protocol (``pg_basebackup -R``), then the primary's WAL streamed
    and replayed. It serves reads only."""
    base.mkdir(parents=True, exist_ok=True)
    _own(base, PG_USER)
    _run(
        _as_service_user(
            PG_USER,
            [
                str(primary.binaries / "pg_basebackup"),
                "-h",
                primary.host,
                "-p",
                str(primary.port),
                "-U",
                PG_USER,
                "-D",
                str(base / "data"),
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
            ],
        ),
        timeout=120,
    )
    standby = DatabaseServer(
        "postgresql", base, free_port(), PG_USER, "", primary.binaries, primary.durable
    )
    standby.start()
    atexit.register(standby.shutdown)
    return standby


def start_mariadb(
    base: Path, durable: bool = False, buffer_pool: str = "128M", tls: ServerTLS | None = None
) -> DatabaseServer:
    binaries = _mariadb_binaries()
    base.mkdir(parents=True, exist_ok=True)
    _own(base, "mysql")
    installer = shutil.which("mariadb-install-db") or str(binaries / "mariadb-install-db")
    _run(
        [
            installer,
            "--no-defaults",
            "--user=mysql",
            f"--datadir={base / 'data'}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        timeout=180,
    )
    server = DatabaseServer(
        "mysql", base, free_port(), MYSQL_USER, MYSQL_PASSWORD, binaries, durable, buffer_pool
    )
    if tls is not None:
        server.tls = _install_tls(base, tls, "mysql")
    server.start()
    atexit.register(server.shutdown)
    _run(
        [
            "mariadb",
            f"--socket={base / 'sock'}",
            "-u",
            "root",
            "-e",
            f"CREATE USER '{MYSQL_USER}'@'127.0.0.1' IDENTIFIED BY '{MYSQL_PASSWORD}'; "
            f"GRANT ALL ON *.* TO '{MYSQL_USER}'@'127.0.0.1' WITH GRANT OPTION;",
        ],
        timeout=60,
    )
    return server


@dataclass
class RedisServer:
    """A Redis server (Debian's ``redis-server``) for the queue's tests. Its data is on disk
    and every write logged before Redis answers (``appendfsync always``), as a deployment
    that must lose nothing runs it: a ``kill -9`` and a start again keep the stream."""

    base: Path
    port: int
    binary: str
    durable: bool = True  # False: nothing on disk; a kill -9 loses the stream
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.base),
                "--save",
                "",
                "--appendonly",
                "yes" if self.durable else "no",
                "--appendfsync",
                "always",
                "--daemonize",
                "no",
                "--logfile",
                str(self.base / "redis.log"),
            ]
        )
        _wait_for_port(self.port, 30, self.process)

    def kill(self) -> None:
        """``kill -9``: what it acknowledged is in its log already."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def shutdown(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.base, ignore_errors=True)


def start_redis(base: Path, port: int | None = None, durable: bool = True) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerUnavailable("redis-server is not installed (apt-get install redis-server)")
    base.mkdir(parents=True, exist_ok=True)
    server = RedisServer(base, port or free_port(), binary, durable)
    server.start()
    atexit.register(server.shutdown)
    return server
