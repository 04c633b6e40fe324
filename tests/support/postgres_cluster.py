"""A throwaway PostgreSQL cluster for the tests and the benchmark: initdb into a temporary
folder, its own port and socket, run as the postgres user (PostgreSQL refuses root)."""

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from support.servers import free_port


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs: Debian's newest (it keeps them off the PATH),
    or wherever ``initdb`` is found."""
    debian = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if debian:
        return Path(max(debian, key=lambda path: int(path.split("/")[4]))).parent
    found = shutil.which("initdb")
    if found and os.path.exists(os.path.join(os.path.dirname(os.path.realpath(found)), "pg_ctl")):
        return Path(os.path.realpath(found)).parent
    raise RuntimeError("PostgreSQL's server is not installed: `make test` installs it")


class PostgresCluster:
    """A throwaway PostgreSQL cluster: initdb into a temporary folder, its own port and socket,
    run as the ``postgres`` user (PostgreSQL refuses root), stopped and removed at the end."""

    TEMPLATE = "customers_template"

    def __init__(
        self, listen: str = "127.0.0.1", allow: tuple[str, ...] = (), shared_buffers: str = "64MB"
    ):
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="customers-pg-"))
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self.listen, self.allow, self.shared_buffers = listen, allow, shared_buffers
        self.names = itertools.count(1)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A PostgreSQL program, as the postgres user."""
        return subprocess.run(
            [str(self.bin / command[0]), *command[1:]],
            user="postgres",
            cwd=self.root,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def init(self) -> "PostgresCluster":
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        with open(self.data / "pg_hba.conf", "a") as hba:
            for network in self.allow:  # the test hosts' namespaces
                hba.write(f"host all all {network} trust\n")
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses='{self.listen}' "
            f"-c max_connections=300 -c shared_buffers={self.shared_buffers}"
        )
        log = str(self.root / "log")
        result = self.run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            log,
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}\n{self.log()}")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def log(self) -> str:
        try:
            return (self.root / "log").read_text(errors="replace")
        except OSError:
            return ""

    def url(self, name: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.port}/{name}"

    def admin(self, sql: str) -> None:
        with psycopg_connect(self.url()) as conn:
            conn.execute(sql)

    def make_template(self) -> None:
        """A migrated database that each test's database is copied from."""
        self.admin(f"CREATE DATABASE {self.TEMPLATE}")
        conn = postgres_backend().connections.connect(self.url(self.TEMPLATE))
        try:
            postgres_backend().schema.migrate(conn)
        finally:
            conn.close()

    def new_database(self, migrated: bool = True) -> str:
        """A fresh database's name: a copy of the migrated template, or empty."""
        name = f"customers_test_{next(self.names)}"
        template = self.TEMPLATE if migrated else "template0"
        self.admin(f"CREATE DATABASE {name} TEMPLATE {template}")
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_backend():
    import customers_service.backends.postgres as backend

    return backend


def psycopg_connect(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True)
