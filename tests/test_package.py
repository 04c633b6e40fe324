"""Installed (not editable) beside a host project with its own app.py, schemas.py and storage.py:
the service is the one package customers_service, and the host's modules stay its own."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv

import pytest
import requests
from support.data import SEED
from support.servers import answers, free_port
from support.service import API_KEY, AUTH, ROOT

HOST_VENV = ROOT / ".cache" / "host-venv"
NOT_SHIPPED = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "build", "*.egg-info", "instance", "__pycache__", "test-artifacts"
)

HOST_APP = textwrap.dedent(
    """
    from flask import Flask

    import schemas
    import storage
    from customers_service.app import bp
    from customers_service.database import prepare_database


    def create_app(database, key):
        app = Flask(__name__, instance_path=database + ".instance")
        app.config.update(CUSTOMERS_DATABASE=database, CUSTOMERS_API_KEYS=[key])

        @app.get("/")
        def home():
            return f"the host's home: {schemas.WHOSE} and {storage.WHOSE}"

        app.register_blueprint(bp, url_prefix="/billing")
        prepare_database(app)  # the host's own start
        return app
    """
)
HOST_CHECK = textwrap.dedent(
    """
    import json, sys
    from app import create_app

    client = create_app(sys.argv[1], sys.argv[2]).test_client()
    auth = {"Authorization": "Bearer " + sys.argv[2]}
    customer = json.loads(sys.argv[3])
    posted = client.post("/billing/api/v1/customers", json={"customer": customer}, headers=auth)
    got = client.get("/billing/api/v1/customers/" + customer["customer_id"], headers=auth)
    home = client.get("/")
    print(json.dumps({
        "post": [posted.status_code, posted.get_json()],
        "get": [got.status_code, got.get_json()],
        "home": [home.status_code, home.get_data(as_text=True)],
    }))
    """
)


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """A venv with the project installed from a copy of it, not in editable mode."""
    source = tmp_path_factory.mktemp("source") / "customers-service"
    shutil.copytree(ROOT, source, ignore=NOT_SHIPPED)
    python = HOST_VENV / "bin" / "python"
    if not python.exists():
        venv.create(HOST_VENV, with_pip=True, clear=True)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps"]
        + ["--no-cache-dir", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    result = subprocess.run(  # the dependencies, kept between runs in .cache/
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return python


@pytest.fixture
def host(tmp_path):
    """A host project whose own modules are named like ours."""
    folder = tmp_path / "host"
    folder.mkdir()
    (folder / "app.py").write_text(HOST_APP)
    (folder / "schemas.py").write_text('WHOSE = "the host\'s schemas"\n')
    (folder / "storage.py").write_text('WHOSE = "the host\'s storage"\n')
    (folder / "check.py").write_text(HOST_CHECK)
    return folder


@pytest.mark.system
def test_the_installed_package_is_one_package_with_no_top_level_modules(installed):
    result = subprocess.run(
        [str(installed), "-c", "import customers_service.app as a; print(a.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    assert "/site-packages/customers_service/app.py" in result.stdout
    site = (HOST_VENV / "lib").glob("python3*/site-packages")
    for folder in site:
        for name in ("app.py", "schemas.py", "storage.py", "wsgi.py"):
            assert not (folder / name).exists(), f"{name} installed at the top level"


@pytest.mark.system
def test_a_host_with_its_own_app_schemas_and_storage_mounts_the_blueprint(installed, host):
    database = str(host / "customers.sqlite3")
    result = subprocess.run(
        [str(installed), "check.py", database, API_KEY, json.dumps(SEED)],
        capture_output=True,
        text=True,
        cwd=host,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["post"][0] == 200
    assert out["post"][1]["customer"]["customer_id"] == SEED["customer_id"]
    assert out["get"] == [200, out["post"][1]]
    assert out["home"] == [200, "the host's home: the host's schemas and the host's storage"]


@pytest.mark.system
def test_gunicorn_serves_the_installed_package_from_any_folder(installed, host):
    bin_folder = installed.parent
    env = {
        "PATH": f"{bin_folder}:/usr/bin:/bin",
        "CUSTOMERS_DATABASE": str(host / "served.sqlite3"),
        "CUSTOMERS_API_KEYS": API_KEY,
    }
    init = [str(bin_folder / "flask"), "--app", "customers_service.wsgi", "customers", "init-db"]
    subprocess.run(init, cwd=host, env=env, check=True, capture_output=True, timeout=60)
    port = free_port()
    proc = subprocess.Popen(
        [str(bin_folder / "gunicorn"), "-b", f"127.0.0.1:{port}", "customers_service.wsgi:app"],
        cwd=host,  # which holds the host's own app.py: it must not be what is served
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert answers(url + "/health", proc), "gunicorn did not answer"
        posted = requests.post(url + "/api/v1/customers", json={"customer": SEED}, headers=AUTH)
        assert posted.status_code == 200
        got = requests.get(url + "/api/v1/customers/" + SEED["customer_id"], headers=AUTH)
        assert got.json() == posted.json()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_repository_root_still_serves_wsgi_app(tmp_path):
    # Its own key and database: with neither, the app would make a key file in the checkout.
    env = {
        **os.environ,
        "CUSTOMERS_API_KEYS": API_KEY,
        "CUSTOMERS_DATABASE": str(tmp_path / "root.sqlite3"),
    }
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi, customers_service.wsgi; print(wsgi.app.name)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "customers_service.app"
