"""The tests' own layout: shared helpers and fakes live in tests/support/, and no module of the
suite imports a test module or conftest.py (pytest loads conftest.py itself; a helper imported
from a test module drags that module's tests and fixtures along). Parsed, not imported."""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent
SUITE = sorted([*TESTS.glob("*.py"), *(TESTS / "support").glob("*.py")])


def forbidden(name: str) -> bool:
    top = name.split(".")[0]
    return top == "conftest" or top.startswith("test_")


def offences(source: str, filename: str) -> Iterator[str]:
    """``<file> (line n) imports <module>`` for each import of a test module or conftest,
    at any depth (a function-level import counts too)."""
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if forbidden(name):
                yield f"{filename} (line {node.lineno}) imports {name}"


def test_no_module_imports_a_test_module_or_conftest() -> None:
    assert len(SUITE) > 40, f"no test modules found in {TESTS}"
    found = [
        offence
        for path in SUITE
        for offence in offences(path.read_text(), str(path.relative_to(TESTS)))
    ]
    assert found == [], "helpers go in tests/support/: " + "; ".join(found)


def test_only_test_modules_and_conftest_sit_at_the_top() -> None:
    """A helper module beside the tests is a test module to the next reader: support/ it is."""
    helpers = [p.name for p in TESTS.glob("*.py") if p.name != "conftest.py"]
    assert [name for name in helpers if not name.startswith("test_")] == []


def test_the_check_catches_each_kind_of_import() -> None:
    source = textwrap.dedent("""
        import test_api
        import conftest, json
        from conftest import fast_settings
        from test_web.sub import x
        from support.market import Market
        from . import test_relative
        def f():
            from test_api import next_batch
    """)
    assert list(offences(source, "test_x.py")) == [
        "test_x.py (line 2) imports test_api",
        "test_x.py (line 3) imports conftest",
        "test_x.py (line 4) imports conftest",
        "test_x.py (line 5) imports test_web.sub",
        "test_x.py (line 9) imports test_api",
    ]
