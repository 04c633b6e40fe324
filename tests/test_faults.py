"""Faults against a real gunicorn: crashes, dead and stuck workers, a full disk, a removed file."""

import os
import shutil
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support.databases import Backend, assert_all_acknowledged_present
from support.filesystems import fill, small_filesystem
from support.load import WriteLoad
from support.servers import Gunicorn
from support.service import AUTH

pytestmark = pytest.mark.system  # a real gunicorn in each; a tmpfs for the full disk


def assert_all_present(db_path, acked: list[dict]) -> None:
    """The file is sound, and every acknowledged customer is in it with the values sent."""
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    backend = Backend("sqlite", {"CUSTOMERS_DATABASE": str(db_path)}, sqlite_path=db_path)
    assert_all_acknowledged_present(backend, acked)


def worker_pids(master_pid: int) -> list[int]:
    with open(f"/proc/{master_pid}/task/{master_pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def test_sigkill_of_the_whole_server_loses_no_acknowledged_write(tmp_path):
    acked: list[dict] = []
    gunicorn = Gunicorn(tmp_path)
    try:
        for _ in range(3):
            gunicorn.start()
            with WriteLoad(gunicorn.url) as load:
                time.sleep(1.5)
                gunicorn.stop(signal.SIGKILL)  # master and workers at once, mid-load
            acked += load.acked
            assert load.acked, "the load wrote nothing before the crash"
            assert set(load.statuses) <= {200}
            assert_all_present(gunicorn.db_path, acked)
    finally:
        gunicorn.stop()


def test_a_killed_worker_loses_no_other_request(tmp_path):
    gunicorn = Gunicorn(tmp_path, workers=2).start()
    try:
        with WriteLoad(gunicorn.url) as load:
            time.sleep(0.5)
            os.kill(worker_pids(gunicorn.proc.pid)[0], signal.SIGKILL)
            time.sleep(1.5)
        # A sync worker holds one request at a time: at most that one is lost, unanswered.
        assert load.connection_errors <= 1
        assert set(load.statuses) == {200}
        assert_all_present(gunicorn.db_path, load.acked)
        assert len(worker_pids(gunicorn.proc.pid)) == 2  # the master replaced it
    finally:
        gunicorn.stop()


def test_a_stuck_worker_is_timed_out_and_loses_no_other_request(tmp_path):
    # The lock wait stays below the worker timeout, or a worker waiting on the stuck one's lock
    # would be timed out too (the rule the README gives for deployments).
    gunicorn = Gunicorn(
        tmp_path, workers=2, env={"CUSTOMERS_SQLITE_TIMEOUT": "1"}, extra_args=("--timeout", "3")
    ).start()
    try:
        with WriteLoad(gunicorn.url) as load:
            time.sleep(0.5)
            stuck = worker_pids(gunicorn.proc.pid)[0]
            os.kill(stuck, signal.SIGSTOP)  # frozen mid-request, perhaps holding the lock
            deadline = time.monotonic() + 15
            while stuck in worker_pids(gunicorn.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert stuck not in worker_pids(gunicorn.proc.pid), "the master kept a stuck worker"
            time.sleep(1)
        assert load.connection_errors <= 1, load.errors
        assert set(load.statuses) <= {200, 503}
        assert_all_present(gunicorn.db_path, load.acked)
    finally:
        gunicorn.stop()


def test_a_full_disk_is_a_503_with_a_code_and_the_service_recovers_by_itself(tmp_path):
    with small_filesystem(tmp_path / "fs", "4m") as fs:
        gunicorn = Gunicorn(tmp_path, db_path=fs / "db.sqlite3").start()
        try:
            session = requests.Session()
            session.headers.update(AUTH)
            big = {"name": "N", "legal_name": "x" * 250, "address_line1": "y" * 250}
            assert (
                session.post(
                    gunicorn.url + "/api/v1/customers",
                    json={"customer": {"customer_id": "before", **big}},
                ).status_code
                == 200
            )
            fill(fs / "filler")
            answers = []
            for i in range(300):
                body = {"customer": {"customer_id": f"full-{i}", **big}}
                response = session.post(
                    gunicorn.url + "/api/v1/customers",
                    json=body,
                    headers={"X-Request-Id": f"full-{i}"},
                )
                answers.append(
                    (
                        response.status_code,
                        response.json()["code"] if response.status_code != 200 else None,
                    )
                )
                if response.status_code == 503:
                    break
            status, code = answers[-1]
            assert status == 503 and code == "database_full", answers[-5:]
            assert all(s in (200, 503) for s, _ in answers)
            assert f"request_id=full-{len(answers) - 1} database_full" in gunicorn.log()
            health = session.get(gunicorn.url + "/health")
            assert health.status_code == 503
            assert health.json()["code"] == "database_full"

            os.remove(fs / "filler")  # the fault clears; nobody restarts anything
            assert session.get(gunicorn.url + "/health").status_code == 200
            response = session.post(
                gunicorn.url + "/api/v1/customers",
                json={"customer": {"customer_id": "after", **big}},
            )
            assert response.status_code == 200
        finally:
            gunicorn.stop()
        with sqlite3.connect(fs / "db.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def answers_from_every_worker(url: str, session: requests.Session, body: dict) -> list:
    """(status, code) of a POST and a /health, sent one after another and 8 at once, so that
    every worker of a 4-worker gunicorn answers some."""

    def one(_) -> tuple:
        with requests.Session() as own:
            own.headers.update(session.headers)
            post = own.post(url + "/api/v1/customers", json=body, headers={"X-Request-Id": "gone"})
            health = own.get(url + "/health")
        return (post.status_code, post.json().get("code"), health.status_code)

    results = [one(n) for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results += list(pool.map(one, range(16)))
    return results


def test_a_removed_database_is_a_503_and_the_service_recovers_when_it_is_back(tmp_path):
    gunicorn = Gunicorn(tmp_path, workers=4).start()  # the project's default on 2 cores
    backup = tmp_path / "backup.sqlite3"
    try:
        session = requests.Session()
        session.headers.update(AUTH)
        body = {"customer": {"customer_id": "kept", "name": "N"}}
        assert session.post(gunicorn.url + "/api/v1/customers", json=body).status_code == 200
        with sqlite3.connect(gunicorn.db_path) as db, sqlite3.connect(backup) as copy:
            db.backup(copy)
        for suffix in ("", "-wal", "-shm"):
            path = f"{gunicorn.db_path}{suffix}"
            if os.path.exists(path):
                os.remove(path)
        # Workers that served before and workers whose first request this is, alike.
        results = answers_from_every_worker(gunicorn.url, session, body)
        assert set(results) == {(503, "database_unavailable", 503)}
        assert "request_id=gone database_unavailable" in gunicorn.log()
        assert not gunicorn.db_path.exists(), "the service made an empty database in its place"
        shutil.copy(backup, gunicorn.db_path)
        for _ in range(8):
            assert session.get(gunicorn.url + "/health").status_code == 200
            got = session.get(gunicorn.url + "/api/v1/customers/kept")
            assert got.status_code == 200
    finally:
        gunicorn.stop()


def test_a_removed_database_folder_is_a_503_and_the_service_recovers_when_it_is_back(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    gunicorn = Gunicorn(tmp_path, workers=4, db_path=folder / "customers.sqlite3").start()
    try:
        session = requests.Session()
        session.headers.update(AUTH)
        body = {"customer": {"customer_id": "kept", "name": "N"}}
        assert session.post(gunicorn.url + "/api/v1/customers", json=body).status_code == 200
        folder.rename(tmp_path / "away")
        results = answers_from_every_worker(gunicorn.url, session, body)
        assert set(results) == {(503, "database_unavailable", 503)}
        assert not folder.exists(), "the service made the folder again"
        (tmp_path / "away").rename(folder)
        for _ in range(8):
            assert session.get(gunicorn.url + "/api/v1/customers/kept").status_code == 200
    finally:
        gunicorn.stop()


def test_a_server_whose_database_folder_is_missing_does_not_start(tmp_path):
    missing = tmp_path / "no-such-folder"
    gunicorn = Gunicorn(tmp_path, db_path=missing / "customers.sqlite3")
    with pytest.raises(RuntimeError, match="did not answer"):
        gunicorn.start()
    assert gunicorn.proc.returncode != 0
    assert f"the database's folder {missing} does not exist" in gunicorn.log()
    assert not missing.exists()
