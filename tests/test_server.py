"""Against a real gunicorn with 2 workers on a loopback port: concurrency and Lago's client."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from support.data import SEED
from support.receiver import Receiver
from support.servers import answers, free_port
from support.service import API_KEY, AUTH, FLASK, ROOT

LAGO_VENV = ROOT / ".cache" / "lago-venv"


@pytest.mark.system
def test_16_clients_upserting_one_customer_leave_one_row(server):
    def client_run(client_number: int) -> list[int]:
        statuses = []
        with requests.Session() as session:
            for attempt in range(10):
                body = {"customer": {**SEED, "name": f"client {client_number} try {attempt}"}}
                response = session.post(
                    server.url + "/api/v1/customers", json=body, headers=AUTH, timeout=30
                )
                statuses.append(response.status_code)
        return statuses

    with ThreadPoolExecutor(16) as pool:
        statuses = [s for run in pool.map(client_run, range(16)) for s in run]
    assert statuses == [200] * 160
    rows = server.backend.fetch("SELECT customer_id, name FROM customers")
    assert len(rows) == 1
    assert rows[0][0] == SEED["customer_id"]
    assert rows[0][1].startswith("client ")


@pytest.mark.system
def test_the_seed_body_through_curl(server):
    raw = json.dumps({"customer": SEED})
    result = subprocess.run(
        ["curl", "-sS", "-X", "POST", server.url + "/api/v1/customers"]
        + ["-H", f"Authorization: Bearer {API_KEY}", "-H", "Content-Type: application/json"]
        + ["-H", "X-Request-Id: curl-1", "-d", raw],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(result.stdout)["customer"]["customer_id"] == SEED["customer_id"]
    assert "request_id=curl-1" in server.log()


def lago_python() -> Path:
    """The python of a venv holding lago-python-client 0.5.0, made once and kept in .cache/."""
    python = LAGO_VENV / "bin" / "python"
    marker = LAGO_VENV / ".installed"
    if not marker.exists():
        venv.create(LAGO_VENV, with_pip=True, clear=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet"]
            + ["lago-python-client==0.5.0", "pydantic<2"],
            check=True,
            timeout=600,
        )
        marker.touch()
    return python


LAGO_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from lago_python_client.client import Client
    from lago_python_client.clients.base_client import LagoApiError
    from lago_python_client.models.customer import Customer

    url, key = sys.argv[1], sys.argv[2]
    client = Client(api_key=key, api_url=url)
    created = client.customers().create(Customer(customer_id="lago-1", name="Gavin", country="US"))
    updated = client.customers().create(
        Customer(customer_id="lago-1", name="Gavin Belson", city="Woodland Hills")
    )
    try:
        client.customers().create(Customer(customer_id="lago-1", name="G", country="XX"))
        bad_country = "accepted"
    except LagoApiError as e:
        bad_country = str(e)
    found = client.customers().find("lago-1")
    print(json.dumps({
        "created": created.dict(), "updated": updated.dict(), "bad_country": bad_country,
        "found": found.dict(),
    }))
    """
)


@pytest.fixture(scope="session")
def lago_client_python():
    try:
        return lago_python()
    except subprocess.CalledProcessError as e:
        pytest.fail(f"could not install lago-python-client 0.5.0: {e}")


@pytest.mark.system
def test_lagos_python_client_of_2022_works_unchanged(server, lago_client_python):
    """It knows no metadata: a customer's metadata set through the API survives its updates
    (it sends every field of its model, never metadata), and its reads ignore it."""
    requests.post(
        server.url + "/api/v1/customers",
        json={"customer": {"customer_id": "lago-1", "name": "G", "metadata": {"crm_id": "7"}}},
        headers=AUTH,
    ).raise_for_status()
    result = subprocess.run(
        [str(lago_client_python), "-c", LAGO_SCRIPT, server.url, API_KEY],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["created"]["customer_id"] == "lago-1"
    assert out["created"]["country"] == "US"
    assert out["updated"]["lago_id"] == out["created"]["lago_id"]
    assert out["updated"]["name"] == "Gavin Belson"
    assert out["updated"]["city"] == "Woodland Hills"
    # The client sends every field of its model, so absent-in-Python means null: it clears.
    assert out["updated"]["country"] is None
    assert "Status code: 422" in out["bad_country"]
    assert "not_a_valid_country_code" in out["bad_country"]
    assert out["found"] == out["updated"]
    stored = requests.get(server.url + "/api/v1/customers/lago-1", headers=AUTH).json()
    assert stored["customer"]["metadata"] == {"crm_id": "7"}


def test_importing_wsgi_opens_no_database(tmp_path):
    db = tmp_path / "lazy.sqlite3"
    env = {"PATH": "/usr/bin:/bin", "CUSTOMERS_DATABASE": str(db), "CUSTOMERS_API_KEYS": API_KEY}
    subprocess.run([sys.executable, "-c", "import wsgi"], cwd=ROOT, env=env, check=True, timeout=60)
    assert not db.exists()


def test_flask_development_server_serves_the_api(tmp_path):
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "CUSTOMERS_DATABASE": str(tmp_path / "dev.sqlite3"),
        "CUSTOMERS_API_KEYS": API_KEY,
    }
    command = [*FLASK, "run", "-p", str(port)]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert answers(url + "/health", proc), "flask run did not answer"
        response = requests.post(url + "/api/v1/customers", json={"customer": SEED}, headers=AUTH)
        assert response.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def session_processes(session_id: int) -> list[int]:
    """The pids of the processes still in that session."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session_id:
                pids.append(int(entry.name))
    return pids


def start_make_run(env: dict) -> subprocess.Popen:
    """``make run`` in a session and process group of its own, as a terminal gives it."""
    return subprocess.Popen(
        ["make", "-s", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def assert_session_ends(session_id: int, message: str) -> None:
    """Every process of that session ends within 15 s."""
    deadline = time.monotonic() + 15
    while session_processes(session_id):
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def runs_gunicorn(pid: int) -> bool:
    """Whether the process is a gunicorn (its script is the second word of its command)."""
    words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return len(words) > 1 and words[1].endswith(b"gunicorn")


def gunicorn_master(session_id: int) -> int:
    """The pid of the gunicorn master among that session's processes."""
    for pid in session_processes(session_id):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if runs_gunicorn(pid) and not runs_gunicorn(parent):
                return pid
        except OSError:
            continue
    raise AssertionError("no gunicorn master found")


@pytest.mark.system
@pytest.mark.parametrize(
    "stop", ["ctrl-c", "sigterm to the group", "sigterm to make", "gunicorn ends"]
)
def test_make_run_starts_the_deliverer_beside_gunicorn_and_stops_it_with_it(tmp_path, stop):
    port = free_port()
    env = {
        **os.environ,
        "CUSTOMERS_BIND": f"127.0.0.1:{port}",
        "CUSTOMERS_WORKERS": "1",
        "CUSTOMERS_DATABASE": str(tmp_path / "run.sqlite3"),
        "CUSTOMERS_API_KEYS": API_KEY,
        "CUSTOMERS_WEBHOOK_POLL_SECONDS": "0.05",
    }
    subprocess.run(["make", "-s", "-C", str(ROOT), f"{ROOT}/.venv/.installed"], check=True)
    make = start_make_run(env)
    receiver = Receiver().start()
    try:
        url = f"http://127.0.0.1:{port}"
        assert answers(url + "/health", make), "make run did not serve"
        added = subprocess.run(
            [*FLASK, "customers", "add-webhook"] + [receiver.url],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        receiver.secret = json.loads(added.stdout)["secret"]
        body = {"customer": SEED}
        assert requests.post(url + "/api/v1/customers", json=body, headers=AUTH).status_code == 200
        deadline = time.monotonic() + 30
        while not receiver.delivered():
            assert time.monotonic() < deadline, "the deliverer of make run sent nothing"
            time.sleep(0.05)
        assert receiver.arrivals[0].signed
        if stop == "ctrl-c":
            os.killpg(make.pid, signal.SIGINT)
        elif stop == "sigterm to the group":
            os.killpg(make.pid, signal.SIGTERM)
        elif stop == "sigterm to make":  # a process manager's stop: make passes it on
            make.terminate()
        else:  # gunicorn alone stops: the deliverer must not outlive it
            os.kill(gunicorn_master(make.pid), signal.SIGTERM)
        make.wait(timeout=30)
        assert_session_ends(make.pid, "a process of make run outlived it")
    finally:
        receiver.stop()
        for pid in session_processes(make.pid):  # only ours: the session this test started
            os.kill(pid, signal.SIGKILL)


@pytest.mark.system
def test_make_run_fails_when_gunicorn_cannot_start_and_leaves_nothing_running(tmp_path):
    with socket.socket() as taken:  # gunicorn cannot bind a port already in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **os.environ,
            "CUSTOMERS_BIND": f"127.0.0.1:{taken.getsockname()[1]}",
            "CUSTOMERS_DATABASE": str(tmp_path / "run.sqlite3"),
            "CUSTOMERS_API_KEYS": API_KEY,
        }
        make = start_make_run(env)
        try:
            assert make.wait(timeout=60) != 0
            assert_session_ends(make.pid, "the deliverer outlived a failed start")
        finally:
            for pid in session_processes(make.pid):
                os.kill(pid, signal.SIGKILL)
