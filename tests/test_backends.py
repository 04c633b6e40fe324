"""The backends are a family: both implement storage.Backend, each operation with the protocol's
signature, and neither loads the other, nor anything of HTTP."""

import ast
import inspect
import json
import pathlib
import subprocess
import sys

import pytest

from customers_service import storage

PACKAGE = pathlib.Path(storage.__file__).parent
BACKENDS = ("sqlite", "postgres")


def parameters(function, skip: int = 0) -> list[tuple]:
    """A function's parameters as (name, kind, default), annotations aside: each backend names
    its own driver's connection type."""
    found = list(inspect.signature(function).parameters.values())[skip:]
    return [(p.name, p.kind, p.default) for p in found]


def protocol_members(protocol: type) -> list[str]:
    """The operations a Protocol states (its own methods, not typing's)."""
    return [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]


@pytest.mark.parametrize("name", BACKENDS)
def test_each_backend_implements_every_operation_with_its_signature(name):
    backend = storage.load_backend(name)
    for operation in protocol_members(storage.Backend):
        implemented = getattr(backend, operation)
        assert parameters(implemented) == parameters(getattr(storage.Backend, operation), 1), (
            name,
            operation,
        )
    assert issubclass(backend.Error, Exception)
    assert isinstance(backend.IMPORT_PAUSE, float)
    assert isinstance(backend.IMPORT_BODIES, bool)
    for method in protocol_members(storage.Connections):
        assert parameters(getattr(backend.Connections, method)) == parameters(
            getattr(storage.Connections, method)
        ), (name, method)


def test_the_store_offers_each_operation_and_nothing_else():
    calls = []

    class Recorder:
        def __getattr__(self, operation):
            return lambda conn, *args: calls.append((operation, conn, args)) or operation

    store = storage.Store(Recorder(), "the connection", None)
    assert store.get_customer("alice") == "get_customer"
    assert store.events_page(2**70, 5) == "events_page"  # no sequence is that large
    assert calls == [
        ("get_customer", "the connection", ("alice",)),
        ("events_page", "the connection", (storage.LARGEST_SEQUENCE, 5)),
    ]
    assert storage.OPERATIONS == set(protocol_members(storage.Backend)) - {"where", "fault"}
    with pytest.raises(AttributeError):
        store.drop_everything  # noqa: B018


def modules_loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statement``."""
    script = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout))


def test_the_postgres_backend_loads_nothing_of_sqlite():
    loaded = modules_loaded_by("import customers_service.backends.postgres")
    assert "customers_service.backends.postgres.events" in loaded
    assert not {m for m in loaded if "sqlite" in m or "wal_sync" in m}


def test_the_sqlite_backend_loads_nothing_of_postgres():
    loaded = modules_loaded_by("import customers_service.backends.sqlite")
    assert "customers_service.backends.sqlite.events" in loaded
    assert not {m for m in loaded if "postgres" in m or m.startswith("psycopg")}


def test_storage_and_the_backends_load_nothing_of_http():
    loaded = modules_loaded_by(
        "import customers_service.storage, customers_service.backends.sqlite, "
        "customers_service.backends.postgres"
    )
    http = {"flask", "werkzeug", "marshmallow", "customers_service.list_query"}
    http |= {"customers_service.responses", "customers_service.body", "customers_service.app"}
    assert not loaded & http


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a source file names in an import statement, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(("name", "other"), [("sqlite", "postgres"), ("postgres", "sqlite")])
def test_no_backend_imports_the_other(name, other):
    for path in (PACKAGE / "backends" / name).glob("*.py"):
        assert not {m for m in imported_modules(path) if f"backends.{other}" in m}, path
    shared = imported_modules(PACKAGE / "backends" / "shared.py")
    assert not {m for m in shared if f"backends.{name}" in m}


def test_storage_imports_no_backend():
    """storage.py finds a backend by name when asked: it names none in an import."""
    assert not {m for m in imported_modules(PACKAGE / "storage.py") if "backends" in m}


SKIPPED = {"tests", "bench", "docs", ".venv", "build", ".cache"}  # not the package's modules


def test_no_module_is_over_400_lines():
    sources = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in SKIPPED]
    assert sources
    too_long = {str(p.relative_to(PACKAGE)): n for p in sources if (n := line_count(p)) > 400}
    assert too_long == {}


def line_count(path: pathlib.Path) -> int:
    """How many lines a file has."""
    return len(path.read_text().splitlines())
