"""A throwaway PostgreSQL server on 127.0.0.1 for the store and API tests (Debian's ``postgresql`` package).

The server runs from a temporary folder (data and Unix socket) on a free port, as the ``postgres`` user when the
tests run as root (PostgreSQL refuses to run as root), and is stopped and removed at the end of the session: one per
pytest process, so each pytest-xdist worker has its own. Each test gets a database of its own
(:meth:`PostgresServer.new_database`). Where PostgreSQL is not installed the PostgreSQL tests
skip, unless ``OMI_REQUIRE_POSTGRES=1`` (set by ``.ci/run``, which installs it) makes that a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

STARTUP_SECONDS = 60
PORT_ATTEMPTS = 3  # start on another free port when the chosen one was taken in between


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: Debian keeps them out of PATH, under /usr/lib/postgresql/VERSION/bin."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PostgresServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ``url(database)`` is an SQLAlchemy URL (psycopg 3)."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="omi-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self._user = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.folder, self._user.pw_uid, self._user.pw_gid)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._user is not None:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=STARTUP_SECONDS, check=False,
                              cwd=self.folder)

    def start(self) -> None:
        done = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        log_file = self.folder / "server.log"
        for attempt in range(PORT_ATTEMPTS):
            # the port was free when chosen; another process (a parallel pytest-xdist worker) may have taken it since
            if attempt:
                self.port = _free_port()
            options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
            done = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(log_file),
                             "-w", "-t", str(STARTUP_SECONDS), "start")
            if not done.returncode:
                return
            log = log_file.read_text() if log_file.exists() else ""
            if "could not bind" not in log and "already in use" not in log:
                break
            log_file.unlink()
        raise RuntimeError(f"pg_ctl start failed: {done.stdout[-1000:]}{done.stderr[-1000:]}{log[-2000:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        import sqlalchemy

        name = f"omi_{uuid.uuid4().hex[:12]}"
        engine = sqlalchemy.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
