"""The documentation kept in step with the code, as sqlite-utils' test_docs.py does: every setting,
command, error code and module is documented, and every relative link resolves."""

import re
from pathlib import Path

import click
import pytest

from customers_service import settings
from customers_service.app import create_app
from customers_service.commands import cli
from customers_service.schemas import ErrorSchema

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MOST_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
BACKTICKED_WORD = re.compile(r"`([a-z][a-z0-9_]*)`")


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def prose(markdown: str) -> str:
    """The markdown without its fenced code blocks (a ``# comment`` in one is no heading)."""
    return FENCE.sub("", markdown)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, without punctuation but ``-`` and
    ``_``, spaces made hyphens (links and code marks keep only their text)."""
    heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    heading = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(text(path))):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    """The link targets of a markdown file that are not URLs (code blocks and spans left out)."""
    markdown = CODE_SPAN.sub("", prose(text(path)))
    return [
        target
        for target in LINK.findall(markdown)
        if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target)
    ]


def in_code(name: str, markdown: str) -> bool:
    """Whether ``name`` is written as code (a whole word inside backticks) in the markdown."""
    word = re.compile(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])")
    return any(word.search(span) for span in CODE_SPAN.findall(markdown))


def documented_settings() -> set[str]:
    """Every CUSTOMERS_* setting that settings.py defines: those read from the environment, and
    those with a default (in the instance folder or not)."""
    names = {*settings.SETTINGS, *settings.DEFAULTS, *settings.INSTANCE_FILES}
    return {name for name in names if name.startswith("CUSTOMERS_")}


def commands() -> dict[str, click.Command]:
    """Every command of the ``flask customers`` group, by name."""
    return dict(cli.commands)


@pytest.fixture(scope="module")
def openapi_document(tmp_path_factory) -> dict:
    """The standalone app's OpenAPI document, as a client gets it (no database is opened)."""
    folder = tmp_path_factory.mktemp("docs")
    app = create_app(
        {
            "TESTING": True,
            "CUSTOMERS_DATABASE": str(folder / "customers.sqlite3"),
            "CUSTOMERS_API_KEYS": "docs-test-key",
            "CUSTOMERS_API_KEY_FILE": str(folder / "api-keys"),
        }
    )
    response = app.test_client().get("/api/v1/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def error_codes(document: dict) -> set[str]:
    """The error codes the document lists: the words in backticks in its error responses'
    descriptions, less the envelope's own keys and the parameters' names they mention."""
    envelope = set(ErrorSchema().fields)
    parameters = {
        parameter.get("name")
        for operations in document["paths"].values()
        for operation in operations.values()
        for parameter in operation.get("parameters", ())
    }
    codes = set()
    for operations in document["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    codes.update(BACKTICKED_WORD.findall(response.get("description", "")))
    return codes - envelope - parameters


def test_the_readme_is_short():
    lines = text(README).count("\n")
    assert lines <= README_MOST_LINES, f"README.md has {lines} lines; the rest goes into docs/"


@pytest.mark.parametrize("name", sorted(documented_settings()))
def test_every_setting_is_in_settings_md(name):
    assert f"`{name}`" in text(DOCS / "settings.md"), f"{name} is not in docs/settings.md"


def test_settings_are_found():
    assert {"CUSTOMERS_DATABASE", "CUSTOMERS_DATABASE_URL", "CUSTOMERS_API_KEY_FILE"} <= (
        documented_settings()
    )


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_and_option_is_in_operations_md(name):
    operations = text(DOCS / "operations.md")
    assert in_code(name, operations), f"the command {name} is not in docs/operations.md"
    for param in commands()[name].params:
        if isinstance(param, click.Option):
            option = max(param.opts, key=len)
            assert in_code(option, operations), f"{name} {option} is not in docs/operations.md"


def test_error_codes_are_found(openapi_document):
    assert {"validation_errors", "unauthorized", "database_busy"} <= error_codes(openapi_document)


def test_every_error_code_of_the_openapi_document_is_in_api_md(openapi_document):
    api = text(DOCS / "api.md")
    missing = sorted(code for code in error_codes(openapi_document) if f"`{code}`" not in api)
    assert not missing, f"error codes of the OpenAPI document not in docs/api.md: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.name}")
    assert not broken, f"{page.name}: {broken}"


def package_modules() -> list[str]:
    """The package's files: its top-level modules, and each file under backends/ by its path."""
    modules = [path.name for path in ROOT.glob("*.py")]
    modules += [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "backends").rglob("*.py"))
        if "__pycache__" not in path.parts
    ]
    return sorted(modules)


@pytest.mark.parametrize("module", package_modules())
def test_every_module_is_in_architecture_md(module):
    assert f"`{module}`" in text(DOCS / "architecture.md"), (
        f"{module} is not in docs/architecture.md's module map"
    )


def fenced_nginx_directives(markdown: str) -> set[str]:
    """The client_ and proxy_ directives of the markdown's nginx block, without comments."""
    block = re.search(r"^```nginx\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)
    assert block, "no nginx block"
    return nginx_directives(block[1])


def nginx_directives(conf: str) -> set[str]:
    """An nginx configuration's client_ and proxy_ directives, one space between words."""
    lines = (" ".join(line.split("#")[0].split()) for line in conf.splitlines())
    return {line for line in lines if line.startswith(("client_", "proxy_"))}


def test_the_nginx_block_of_deploying_md_is_the_one_the_tests_run():
    servers = text(ROOT / "tests" / "support" / "servers.py")
    tested = re.search(r'^NGINX_CONF = """(.*?)"""', servers, re.MULTILINE | re.DOTALL)
    assert tested, "tests/support/servers.py has no NGINX_CONF"
    server = tested[1].split("server {{", 1)[1]
    assert fenced_nginx_directives(text(DOCS / "deploying.md")) == nginx_directives(server)
