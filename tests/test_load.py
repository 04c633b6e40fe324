"""Slow clients: behind nginx (the documented set-up), they do not hold up anyone else."""

import os
import socket
import threading
import time

import pytest
import requests
from support.data import SEED
from support.servers import Nginx
from support.service import AUTH, ROOT


@pytest.fixture
def nginx(server, tmp_path):
    """nginx on a loopback port in front of the test's gunicorn, stopped by its own pid."""
    proxy = Nginx(tmp_path / "nginx", [f"127.0.0.1:{server.port}"]).start()
    yield proxy.url, proxy.port
    proxy.stop()


def slow_client(port: int, stop: threading.Event, connected: threading.Barrier) -> None:
    """Send a request one byte a second until stopped (bounded: about 10 bytes)."""
    request = b"POST /api/v1/customers HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        connected.wait(timeout=30)
        for byte in request[:12]:
            if stop.is_set():
                break
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            stop.wait(1.0)


@pytest.mark.system
def test_fifty_one_byte_a_second_clients_do_not_delay_others(server, nginx):
    url, port = nginx
    stop = threading.Event()
    connected = threading.Barrier(51)
    threads = [
        threading.Thread(target=slow_client, args=(port, stop, connected)) for _ in range(50)
    ]
    for thread in threads:
        thread.start()
    try:
        connected.wait(timeout=30)
        time.sleep(1.5)  # every slow client is now part-way through its request
        session = requests.Session()
        session.headers.update(AUTH)
        timings = []
        for i in range(20):
            started = time.monotonic()
            body = {"customer": {**SEED, "customer_id": f"fast-{i}"}}
            response = session.post(url + "/api/v1/customers", json=body, timeout=5)
            assert response.status_code == 200
            assert session.get(url + f"/api/v1/customers/fast-{i}", timeout=5).status_code == 200
            timings.append(time.monotonic() - started)
        assert max(timings) < 1.0, timings
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert "request_id=" in server.log()


@pytest.mark.system
def test_nginx_passes_the_callers_request_id(server, nginx):
    url, _ = nginx
    response = requests.get(url + "/health", headers={"X-Request-Id": "through-nginx"}, timeout=5)
    assert response.headers["X-Request-Id"] == "through-nginx"
    assert "request_id=through-nginx" in server.log()


def test_gunicorn_configuration_holds_the_deployment_defaults():
    environment = dict(os.environ)
    config: dict = {}
    exec((ROOT / "gunicorn.conf.py").read_text(), config)
    assert config["worker_class"] == "sync"
    assert config["timeout"] > 5  # above CUSTOMERS_SQLITE_TIMEOUT's default
    assert config["limit_request_line"] == 8190
    assert config["limit_request_fields"] <= 100
    assert config["accesslog"] is None
    assert callable(config["child_exit"])  # a dead worker's metrics files are cleaned up
    assert dict(os.environ) == environment  # reading it changes nothing: on_starting does
