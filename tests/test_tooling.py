"""The tools `make setup` installs are really there (in CI a missing one fails), and the Go tools
come from a cache outside the clone (scripts/go-tool.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support.chart import ROOT, helm
from support.waiting import require_binary


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("redis-server", ["--version"], "Redis server"),
        ("promtool", ["--version"], "promtool"),
        ("amtool", ["--version"], "amtool"),
    ],
)
def test_system_tool_present(tool: str, args: list[str], expected: str) -> None:
    path = require_binary(tool)
    result = subprocess.run([path, *args], capture_output=True, text=True, timeout=30)
    assert expected in result.stdout + result.stderr


def test_project_local_helm_built() -> None:
    result = subprocess.run([helm(), "version", "--short"], capture_output=True, text=True)
    assert result.stdout.startswith("v3.22")  # go install leaves out the patch digit


# --- scripts/go-tool.sh: the Go tools of `make setup`, copied from a cache outside the clone ---

GO_TOOL = ROOT / "scripts" / "go-tool.sh"
H2SPEC_SPEC = "github.com/summerwind/h2spec/cmd/h2spec@v2.2.1+incompatible"


def go_tool(
    dest: Path, spec: str, cache: Path, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOOLS_CACHE": str(cache), **env_extra}
    return subprocess.run(
        [str(GO_TOOL), str(dest), spec], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture
def h2spec_binary() -> Path:
    require_binary("go")
    return Path(require_binary("h2spec", ROOT / ".tools" / "bin"))


def test_go_tool_copies_a_cached_build_and_leaves_a_current_one_alone(
    h2spec_binary: Path, tmp_path: Path
) -> None:
    goversion = subprocess.run(
        ["go", "env", "GOVERSION"], capture_output=True, text=True, check=True
    ).stdout.strip()
    cache = tmp_path / "cache"
    entry = cache / f"h2spec-v2.2.1+incompatible-{goversion}"
    entry.mkdir(parents=True)
    shutil.copy2(h2spec_binary, entry / "h2spec")
    dest = tmp_path / "bin" / "h2spec"
    copied = go_tool(dest, H2SPEC_SPEC, cache)
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout.strip() == f"h2spec v2.2.1+incompatible: from {entry}"
    assert dest.read_bytes() == h2spec_binary.read_bytes()
    # Now current: nothing is copied or built, even with the cache gone.
    shutil.rmtree(cache)
    again = go_tool(dest, H2SPEC_SPEC, cache)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert not cache.exists()


def test_go_tool_replaces_a_binary_of_another_version(h2spec_binary: Path, tmp_path: Path) -> None:
    """A binary at DEST that is not the pinned package and version is not taken for it: the
    script goes to the cache (empty here) and would build; with GOPROXY=off the build fails
    and says so, and DEST is left as it was."""
    dest = tmp_path / "bin" / "h2spec"
    dest.parent.mkdir()
    shutil.copy2(h2spec_binary, dest)
    other = "github.com/summerwind/h2spec/cmd/h2spec@v2.2.0"
    result = go_tool(dest, other, tmp_path / "cache", GOPROXY="off")
    assert result.returncode != 0
    assert f"building {other}" in result.stdout
    assert dest.read_bytes() == h2spec_binary.read_bytes()
    assert list((tmp_path / "cache").iterdir()) == []  # the failed build's folder is gone


@pytest.mark.parametrize("spec", ["github.com/summerwind/h2spec/cmd/h2spec", "pkg@"])
def test_go_tool_without_a_version_is_refused_in_one_line(spec: str, tmp_path: Path) -> None:
    result = go_tool(tmp_path / "h2spec", spec, tmp_path / "cache")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"usage: {GO_TOOL} DEST PACKAGE@VERSION"]
