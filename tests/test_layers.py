"""The package's layers: no module imports a layer above it (or beside it, where that is a rule).

From the bottom: the base modules (codec, errors, settings, tasks, validation, v1,
observability); the engine, which knows its backends only through its ports; the backends
(redis, memory) and the transports; the API; the one composition module, ``wiring``; the
tools and the command line. Every ``pricestream.*`` import counts, wherever it is written:
at the top, inside a function, or under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "service" / "pricestream"

BASE = {"codec", "errors", "settings", "tasks", "validation", "v1", "observability"}
# layer -> the layers it may import (besides its own); None: not limited here.
ALLOWED: dict[str, set[str] | None] = {
    **{layer: BASE for layer in BASE},
    "engine": BASE,
    "redis": BASE - {"validation"} | {"engine"},
    "memory": BASE - {"validation"} | {"engine"},
}
# layer -> the layers it must never import.
FORBIDDEN: dict[str, set[str]] = {
    "engine": {"redis", "memory", "api", "transport", "tools", "wiring", "cli"},
    "redis": {"api", "transport", "tools", "wiring", "cli"},
    "memory": {"api", "transport", "tools", "wiring", "cli"},
    "transport": {"api", "tools", "wiring", "cli"},
    "api": {"tools", "cli"},
}
# Who may import the composition module: the entry points and the server that runs a pod.
WIRING_IMPORTERS = ("pricestream.cli", "pricestream.tools", "pricestream.api.server")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    """'pricestream.engine.hub' -> 'engine'; 'pricestream.wiring' -> 'wiring'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<package>"


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def imports(module: str, is_package: bool, source: str) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every ``pricestream`` import in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pricestream import wiring`` imports the module pricestream.wiring.
            targets = [f"{base}.{alias.name}" for alias in node.names if base == "pricestream"]
            targets = targets or [base]
        else:
            continue
        for target in targets:
            if target == "pricestream" or target.startswith("pricestream."):
                yield node.lineno, target


def broken_rules(module: str, is_package: bool, source: str) -> Iterator[str]:
    own = layer(module)
    for line, target in sorted(imports(module, is_package, source)):
        theirs = layer(target)
        where = f"{module} (line {line}) imports {target}"
        if theirs == own or theirs == "<package>":
            continue
        allowed = ALLOWED.get(own)
        if allowed is not None and theirs not in allowed:
            yield f"{where}: {own} may import only {', '.join(sorted(allowed))}"
        elif theirs in FORBIDDEN.get(own, set()):
            yield f"{where}: {own} never imports {theirs}"
        if theirs == "wiring" and not within(module, WIRING_IMPORTERS):
            yield f"{where}: only {', '.join(WIRING_IMPORTERS)} import the wiring"


def package_violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += broken_rules(
            module_name(path), path.name == "__init__.py", path.read_text(encoding="utf-8")
        )
    return found


def test_every_module_keeps_to_its_layer() -> None:
    assert len(list(PACKAGE.rglob("*.py"))) > 50, f"no package found at {PACKAGE}"
    violations = package_violations()
    for violation in violations:
        print(violation)
    assert not violations, "layer rules broken:\n" + "\n".join(violations)


def test_the_rules_catch_each_kind_of_import() -> None:
    source = """
from typing import TYPE_CHECKING
import pricestream.redis.client
from pricestream.api.rate_limit import PeerRateLimiter
from pricestream import wiring
from ..memory import broker
from .hub import Hub
from pricestream.codec import price_channel
if TYPE_CHECKING:
    from pricestream.transport.http2.calls import ServerCall
def later():
    from pricestream.tools import feed
"""
    found = list(broken_rules("pricestream.engine.engine", False, source))
    assert [f.split(": ")[0] for f in found] == [
        "pricestream.engine.engine (line 3) imports pricestream.redis.client",
        "pricestream.engine.engine (line 4) imports pricestream.api.rate_limit",
        "pricestream.engine.engine (line 5) imports pricestream.wiring",
        "pricestream.engine.engine (line 5) imports pricestream.wiring",
        "pricestream.engine.engine (line 6) imports pricestream.memory",
        "pricestream.engine.engine (line 10) imports pricestream.transport.http2.calls",
        "pricestream.engine.engine (line 12) imports pricestream.tools",
    ], found
    assert found[0].endswith(
        "engine may import only codec, errors, observability, settings, tasks, v1, validation"
    )
    assert found[3].endswith(
        "only pricestream.cli, pricestream.tools, pricestream.api.server import the wiring"
    )
    assert not list(broken_rules("pricestream.cli", False, "from pricestream import wiring"))
    assert list(broken_rules("pricestream.transport.web.app", False, "import pricestream.api"))
    assert not list(
        broken_rules("pricestream.transport.web.app", False, "import pricestream.engine.stream")
    )
