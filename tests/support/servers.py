"""Real servers on free loopback ports, each started and stopped by its own pid: gunicorn
serving wsgi:app, and nginx in front of gunicorns as the README sets it up."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from support.service import API_KEY, ROOT


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, proc: subprocess.Popen, seconds: float = 30) -> bool:
    """Wait until ``url`` answers HTTP; False if ``proc`` ends or time runs out first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            requests.get(url, timeout=1)
            return True
        except requests.ConnectionError:
            time.sleep(0.05)
    return False


class Gunicorn:
    """A real gunicorn serving wsgi:app on a loopback port, stopped by its own pid."""

    def __init__(
        self,
        tmp_path: Path,
        workers: int = 2,
        env: dict | None = None,
        db_path: Path | None = None,
        extra_args: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        namespace: str | None = None,
    ):
        self.port = free_port()
        self.host, self.namespace = host, namespace
        self.url = f"http://{host}:{self.port}"
        self.db_path = db_path or tmp_path / "customers.sqlite3"
        self.extra_args = list(extra_args)
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        self.env = {
            **os.environ,
            "CUSTOMERS_DATABASE": str(self.db_path),
            "CUSTOMERS_API_KEYS": API_KEY,
            "CUSTOMERS_API_KEY_FILE": str(tmp_path / "api-keys"),
            **(env or {}),
        }
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gunicorn":
        log = open(self.log_path, "ab")
        in_namespace = ["ip", "netns", "exec", self.namespace] if self.namespace else []
        self.proc = subprocess.Popen(
            [
                *in_namespace,  # ip execs the server: the pid stays the server's
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn.conf.py",
                "-b",
                f"{self.host}:{self.port}",
                "-w",
                str(self.workers),
                *self.extra_args,
                "wsgi:app",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so its workers stop with it
        )
        log.close()
        if not answers(self.url + "/health", self.proc):
            self.stop()
            raise RuntimeError(f"gunicorn did not answer:\n{self.log()}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the process group we started, and wait for the master to end."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# The README's nginx block, plus what a test needs to run it unprivileged in a temporary folder.
NGINX_CONF = """
worker_processes 1;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream customers {{ {servers} }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64k;
        client_header_timeout 10s;
        client_body_timeout 10s;
        location / {{
            proxy_pass http://customers;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Request-Id $http_x_request_id;
        }}
    }}
}}
"""


class Nginx:
    """nginx on a loopback port in front of gunicorns, as the README sets it up; stopped by its
    own pid."""

    def __init__(self, prefix: Path, upstreams: list[str]):
        self.prefix, self.upstreams = prefix, upstreams
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.prefix.mkdir(exist_ok=True)
        conf = self.prefix / "nginx.conf"
        servers = " ".join(f"server {address};" for address in self.upstreams)
        conf.write_text(NGINX_CONF.format(prefix=self.prefix, servers=servers, port=self.port))
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(self.prefix), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not answers(self.url + "/health", self.proc, seconds=15):
            self.stop()
            pytest.fail(f"nginx did not start: {(self.prefix / 'error.log').read_text()}")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
