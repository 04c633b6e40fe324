"""The operator commands: flask customers init-db, API keys, import and export."""

import json
import os
import pty
import signal
import sqlite3
import stat
import subprocess
import time

import pytest
from support.data import SEED
from support.service import API_KEY, FLASK, ROOT, post_customer

from customers_service.app import create_app
from customers_service.backends.sqlite import customers as sqlite_customers
from customers_service.backends.sqlite import schema as sqlite_schema


def invoke(runner, *args, input=None):
    return runner.invoke(args=["customers", *args], input=input)


def rows(db_path) -> list[dict]:
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        query = f"SELECT {sqlite_customers.SELECTED} FROM customers ORDER BY customer_id"
        return [dict(row) for row in db.execute(query)]


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def test_init_db_is_safe_to_run_again(runner, db_path):
    for _ in range(3):
        result = invoke(runner, "init-db")
        assert result.exit_code == 0, result.output
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(sqlite_schema.MIGRATIONS)
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600


def test_create_list_and_revoke_api_keys(app, runner, client, tmp_path):
    created = invoke(runner, "create-api-key")
    assert created.exit_code == 0
    key = created.stdout.strip()
    key_file = tmp_path / "api-keys"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert post_customer(client, SEED, {"Authorization": f"Bearer {key}"}).status_code == 200

    second = invoke(runner, "create-api-key").stdout.strip()
    listed = invoke(runner, "list-api-keys").stdout
    assert key[:8] + "..." in listed and second[:8] + "..." in listed
    assert key not in listed and second not in listed

    revoked = invoke(runner, "revoke-api-key", key[:16])
    assert revoked.exit_code == 0, revoked.output
    assert post_customer(client, SEED, {"Authorization": f"Bearer {key}"}).status_code == 401
    assert post_customer(client, SEED, {"Authorization": f"Bearer {second}"}).status_code == 200


def test_revoke_needs_a_prefix_of_exactly_one_key(runner):
    invoke(runner, "create-api-key")
    invoke(runner, "create-api-key")
    ambiguous = invoke(runner, "revoke-api-key", "cus_")
    assert ambiguous.exit_code != 0
    assert "2 keys" in ambiguous.output
    missing = invoke(runner, "revoke-api-key", "nothing-like-it")
    assert missing.exit_code != 0
    assert "no key" in missing.output
    assert len(invoke(runner, "list-api-keys").stdout.splitlines()) == 3  # 2 and the configured


def test_import_jsonl_with_and_without_the_envelope(runner, tmp_path, db_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"customer": SEED}, {"customer_id": "plain", "name": "Plain", "country": "fr"}],
    )
    result = invoke(runner, "import", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("2 inserted, 0 updated, 0 unchanged, 0 rejected")
    by_id = {r["customer_id"]: r for r in rows(db_path)}
    assert by_id["plain"]["country"] == "FR"
    assert by_id[SEED["customer_id"]]["name"] == SEED["name"]


def test_import_follows_the_upsert_rule(runner, client, tmp_path, db_path):
    post_customer(client, SEED)
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"customer_id": SEED["customer_id"], "name": "Renamed", "email": None}],
    )
    result = invoke(runner, "import", path)
    assert result.stdout.startswith("0 inserted, 1 updated, 0 unchanged, 0 rejected")
    customer = client.get(
        f"/api/v1/customers/{SEED['customer_id']}", headers={"Authorization": f"Bearer {API_KEY}"}
    ).get_json()["customer"]
    assert customer["name"] == "Renamed"
    assert customer["email"] is None  # null clears
    assert customer["city"] == SEED["city"]  # absent keeps


def test_rejected_rows_are_reported_with_line_numbers_and_never_stop_the_rest(
    runner, tmp_path, db_path
):
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"customer_id": "ok-1", "name": "A"})
        + "\n\n"
        + json.dumps({"customer_id": "bad-1", "name": "", "country": "ZZ"})
        + "\nnot json at all\n"
        + json.dumps({"customer_id": "bad-2", "name": "B", "vat_rate": 20})
        + "\n[1, 2]\n"
        + json.dumps({"customer_id": "ok-2", "name": "C"})
        + "\n"
    )
    rejects = tmp_path / "rejects.jsonl"
    result = invoke(runner, "import", str(source), "--rejects", str(rejects))
    assert result.exit_code == 1
    assert result.stdout.startswith("2 inserted, 0 updated, 0 unchanged, 4 rejected")
    both = '{"country": ["not_a_valid_country_code"], "name": ["value_is_mandatory"]}'
    assert f"line 3: rejected: {both}" in result.stderr
    assert 'line 4: rejected: {"_row": ["invalid_json"]}' in result.stderr
    assert 'line 5: rejected: {"vat_rate": ["unknown_field"]}' in result.stderr
    assert 'line 6: rejected: {"_row": ["bad_request"]}' in result.stderr
    assert [r["customer_id"] for r in rows(db_path)] == ["ok-1", "ok-2"]
    refused = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["line"] for r in refused] == [3, 4, 5, 6]
    assert refused[0] == {
        "line": 3,
        "errors": {"country": ["not_a_valid_country_code"], "name": ["value_is_mandatory"]},
        "customer": {"customer_id": "bad-1", "name": "", "country": "ZZ"},
    }


def test_a_fixed_rejects_file_imports(runner, tmp_path, db_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"customer_id": "c", "name": "N", "email": "x"}])
    rejects = tmp_path / "rejects.jsonl"
    invoke(runner, "import", source, "--rejects", str(rejects))
    fixed = json.loads(rejects.read_text())
    fixed["customer"]["email"] = "c@example.com"
    rejects.write_text(json.dumps(fixed) + "\n")
    result = invoke(runner, "import", str(rejects))
    assert result.exit_code == 0, result.output
    assert rows(db_path)[0]["email"] == "c@example.com"


def test_import_csv_with_a_header_row(runner, tmp_path, db_path):
    source = tmp_path / "in.csv"
    source.write_text(
        "customer_id,name,country,city,address_line1\n"
        'c1,"Belson, Gavin",us,,"5230 Penfield Ave\nSuite 1"\n'
        "c2,,ZZ,Paris,\n"
        "c3,Three,FR,Lyon,x,extra-cell\n"
    )
    result = invoke(runner, "import", str(source))
    assert result.exit_code == 1
    assert result.stdout.startswith("1 inserted, 0 updated, 0 unchanged, 2 rejected")
    both = '{"country": ["not_a_valid_country_code"], "name": ["value_is_mandatory"]}'
    assert f"line 4: rejected: {both}" in result.stderr
    assert 'line 5: rejected: {"_row": ["too_many_cells"]}' in result.stderr
    (row,) = rows(db_path)
    assert (row["customer_id"], row["name"], row["country"]) == ("c1", "Belson, Gavin", "US")
    assert row["address_line1"] == "5230 Penfield Ave\nSuite 1"
    assert row["city"] is None  # an empty cell is null


def test_csv_empty_cell_clears_like_null(runner, client, tmp_path, db_path):
    post_customer(client, SEED)
    source = tmp_path / "in.csv"
    source.write_text(f"customer_id,name,email\n{SEED['customer_id']},Gavin,\n")
    assert invoke(runner, "import", str(source)).exit_code == 0
    (row,) = rows(db_path)
    assert row["email"] is None and row["city"] == SEED["city"]


def test_csv_with_bad_utf8_rejects_that_row_only(runner, tmp_path, db_path):
    source = tmp_path / "in.csv"
    source.write_bytes(b"customer_id,name\nc1,Good\nc2,Bad \xff name\nc3,Good too\n")
    result = invoke(runner, "import", str(source))
    assert result.exit_code == 1
    assert 'line 3: rejected: {"_row": ["invalid_utf8"]}' in result.stderr
    assert [r["customer_id"] for r in rows(db_path)] == ["c1", "c3"]


def test_format_by_option_and_stdin(runner, tmp_path, db_path):
    data = json.dumps({"customer_id": "from-stdin", "name": "N"}) + "\n"
    result = invoke(runner, "import", "-", "--format", "jsonl", input=data)
    assert result.exit_code == 0, result.output
    odd = tmp_path / "customers.txt"
    odd.write_text("customer_id,name\nfrom-csv,N\n")
    assert invoke(runner, "import", str(odd)).exit_code != 0  # no format from .txt
    assert invoke(runner, "import", str(odd), "--format", "csv").exit_code == 0
    assert [r["customer_id"] for r in rows(db_path)] == ["from-csv", "from-stdin"]


def test_export_then_import_into_an_empty_database_gives_the_same_rows(
    runner, client, tmp_path, db_path
):
    post_customer(client, SEED)
    post_customer(client, {"customer_id": 'ünï/cödé "x"\n', "name": "N", "country": "fr"})
    post_customer(client, {"customer_id": "c3", "name": "Three", "url": "https://x.example/a?b=c"})
    out = tmp_path / "export.jsonl"
    result = invoke(runner, "export", str(out))
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert (
        json.loads(lines[0])
        == client.get(
            f"/api/v1/customers/{SEED['customer_id']}",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ).get_json()
    )

    other_db = tmp_path / "other.sqlite3"
    env = {**os.environ, "CUSTOMERS_DATABASE": str(other_db), "CUSTOMERS_API_KEYS": API_KEY}
    imported = subprocess.run(
        [*FLASK, "customers", "import", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    assert rows(other_db) == rows(db_path)


def test_export_to_stdout_streams_json_lines(runner, client):
    for i in range(3):
        post_customer(client, {"customer_id": f"c{i}", "name": "N"})
    result = invoke(runner, "export")
    ids = [json.loads(line)["customer"]["customer_id"] for line in result.stdout.splitlines()]
    assert ids == ["c0", "c1", "c2"]
    assert "exported 3 customers" in result.stderr


def test_rerunning_the_same_file_is_harmless(runner, tmp_path, db_path):
    path = write_jsonl(
        tmp_path / "in.jsonl", [{"customer_id": f"c{i}", "name": "N"} for i in range(50)]
    )
    assert invoke(runner, "import", path, "--batch-size", "7").stdout.startswith("50 inserted")
    before = rows(db_path)
    again = invoke(runner, "import", path, "--batch-size", "7")
    assert again.exit_code == 0
    assert again.stdout.startswith("0 inserted, 0 updated, 50 unchanged, 0 rejected")
    assert rows(db_path) == before  # updated_at kept: the rows changed nothing


def test_a_restored_lago_id_that_another_customer_has_is_rejected(runner, client, tmp_path):
    taken = post_customer(client, SEED).get_json()["customer"]["lago_id"]
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"customer_id": "a", "name": "A"},
            {"customer_id": "b", "name": "B", "lago_id": taken},
            {"customer_id": "c", "name": "C"},
        ],
    )
    result = invoke(runner, "import", path)
    assert result.exit_code == 1
    assert result.stdout.startswith("2 inserted, 0 updated, 0 unchanged, 1 rejected")
    assert 'line 2: rejected: {"lago_id": ["lago_id_taken"]}' in result.stderr


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_jobs_give_the_same_result(runner, tmp_path, db_path, jobs):
    items = [{"customer_id": f"c{i % 30}", "name": f"N{i}"} for i in range(100)]
    path = write_jsonl(tmp_path / "in.jsonl", items)
    result = invoke(runner, "import", path, "--jobs", jobs, "--batch-size", "9")
    assert result.stdout.startswith("30 inserted, 70 updated, 0 unchanged, 0 rejected")
    last_names = {f"c{k}": f"N{90 + k if k < 10 else 60 + k}" for k in range(30)}
    assert {r["customer_id"]: r["name"] for r in rows(db_path)} == last_names


def big_file(tmp_path, count: int) -> str:
    return write_jsonl(
        tmp_path / "big.jsonl",
        [{**SEED, "customer_id": f"c{i:06d}", "name": f"Name {i}"} for i in range(count)],
    )


def import_process(tmp_path, db_path, source: str, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "CUSTOMERS_DATABASE": str(db_path), "CUSTOMERS_API_KEYS": API_KEY}
    command = [*FLASK, "customers", "import", source]
    return subprocess.Popen([*command, *extra], cwd=ROOT, env=env, **popen)


def wait_for_rows(db_path, at_least: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if db_path.exists():
            try:
                with sqlite3.connect(db_path, timeout=1) as db:
                    if db.execute("SELECT n FROM customer_count").fetchone()[0] >= at_least:
                        return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.01)
    pytest.fail("the import committed nothing in time, or ended too early")


def import_interrupted_later(tmp_path, db_path, **popen) -> tuple[str, subprocess.Popen]:
    """An import of 30,000 rows in batches of 250, returned once 1,000 are committed."""
    source = big_file(tmp_path, 30_000)
    proc = import_process(tmp_path, db_path, source, "--batch-size", "250", **popen)
    wait_for_rows(db_path, 1000, proc)
    return source, proc


def committed_count(db_path) -> int:
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT count(*) FROM customers").fetchone()[0]


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                fields = stat_file.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            children.append(int(entry))
    return children


def wait_until_gone(pids: list[int], seconds: float = 10) -> list[int]:
    """The pids still alive after up to ``seconds`` (zombies count as gone)."""
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as stat_file:
                    if stat_file.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(pid)
            except OSError:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_a_killed_import_leaves_only_whole_batches_and_a_rerun_finishes(tmp_path, db_path):
    source, proc = import_interrupted_later(
        tmp_path, db_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    workers = child_pids(proc.pid)
    assert workers, "the import checks rows in worker processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # Its workers end with it, instead of waiting forever for rows.
    assert wait_until_gone(workers) == []
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        names = db.execute("SELECT customer_id, name FROM customers ORDER BY id").fetchall()
    count = committed_count(db_path)
    assert 0 < count < 30_000
    assert count % 250 == 0
    assert names == [(f"c{i:06d}", f"Name {i}") for i in range(count)]
    rerun = import_process(tmp_path, db_path, source, stdout=subprocess.PIPE, text=True)
    out, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0
    assert out.startswith(
        f"{30_000 - count:,} inserted, 0 updated, {count:,} unchanged, 0 rejected"
    )


def test_ctrl_c_keeps_committed_batches_and_says_so(tmp_path, db_path):
    _, proc = import_interrupted_later(
        tmp_path,
        db_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted; committed so far:" in err
    count = committed_count(db_path)
    assert 0 < count < 30_000 and count % 250 == 0


def test_progress_bar_with_rows_per_second_on_a_terminal(tmp_path, db_path):
    source = big_file(tmp_path, 3000)
    controller, terminal = pty.openpty()
    proc = import_process(
        tmp_path,
        db_path,
        source,
        "--batch-size",
        "100",
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        shown += chunk
    proc.wait(timeout=60)
    os.close(controller)
    assert proc.returncode == 0
    assert b"rows/s" in shown and b"[#" in shown and b"100%" in shown


def test_no_progress_bar_when_not_a_terminal(runner, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"customer_id": "c", "name": "N"}])
    result = invoke(runner, "import", path)
    assert "\r" not in result.output


def test_init_db_says_clearly_when_the_database_folder_is_missing(tmp_path):
    missing = tmp_path / "no-such-folder"
    app = create_app(
        {"CUSTOMERS_DATABASE": str(missing / "customers.sqlite3"), "CUSTOMERS_API_KEYS": "k"}
    )
    result = app.test_cli_runner().invoke(args=["customers", "init-db"])
    assert result.exit_code != 0
    assert f"the database's folder {missing} does not exist" in result.output
    assert "Traceback" not in result.output
    assert not missing.exists()


def test_export_of_a_missing_database_fails_and_creates_nothing(db_path):
    app = create_app({"CUSTOMERS_DATABASE": str(db_path), "CUSTOMERS_API_KEYS": "k"})
    result = invoke(app.test_cli_runner(), "export")
    assert result.exit_code != 0
    assert "missing" in result.output
    assert not db_path.exists()
