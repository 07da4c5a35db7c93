"""The README and docs/ hold together: every relative link and `#anchor` resolves, every page is
reachable from the README, and the README stays a front page."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
# Linked before they land: written for another issue (29: what a gRPC client sees at the stream
# limit, which statuses are safe to retry). Remove an entry once its page is committed.
PENDING: set[Path] = set()  # pages linked before they are written (none now)

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text with fenced blocks and code spans blanked: links there are not links."""
    text = FENCE.sub("", text)
    return CODE_SPAN.sub(lambda m: "" if "](" in m.group(0) else m.group(0), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but `-` and `_`
    removed, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(FENCE.sub("", page.read_text())):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)


def resolve(page: Path, target: str) -> tuple[Path, str]:
    path, _, anchor = target.partition("#")
    return ((page.parent / unquote(path)).resolve() if path else page), anchor


def test_the_checker_knows_githubs_slugs() -> None:
    metrics = "Metrics (`GET /metrics` on the HTTP port)"
    assert slug(metrics) == "metrics-get-metrics-on-the-http-port"
    assert slug("Alerts & dashboards") == "alerts--dashboards"
    assert slug("cluster (sharded Pub/Sub)") == "cluster-sharded-pubsub"
    assert slug("`pricestream audit-logs`") == "pricestream-audit-logs"
    assert links(README), "no link found in README.md: the link pattern is broken"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if not relative(target):
            continue
        path, anchor = resolve(page, target)
        if not path.exists():
            if path not in PENDING:
                broken.append(f"{target}: no such file")
            continue
        if anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.name}")
    assert not broken, "\n".join(broken)


def test_every_page_is_reachable_from_the_readme() -> None:
    reached, todo = {README}, [README]
    while todo:
        page = todo.pop()
        for target in links(page):
            path, _ = resolve(page, target)
            if relative(target) and path.suffix == ".md" and path.exists() and path not in reached:
                reached.add(path)
                todo.append(path)
    unreachable = sorted(str(p.relative_to(ROOT)) for p in set(PAGES) - reached)
    assert not unreachable, unreachable


def test_the_docs_index_links_every_top_level_page() -> None:
    index = ROOT / "docs/README.md"
    linked = {resolve(index, t)[0] for t in links(index) if relative(t)}
    pages = set((ROOT / "docs").glob("*.md")) - {index}
    missing = sorted(p.name for p in pages - linked)
    assert not missing, f"docs/README.md does not link {missing}"


def test_the_readme_is_a_front_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 160
    assert "make demo" in text and "make test" in text
    assert "gRPC clients" in text and "browsers" in text  # the diagram's two kinds of client


REPO_PATH = re.compile(r"`((?:bench|dashboards|deploy|docs|proto|scripts|service|tests)/[\w./-]*)`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_in_code_exists(page: Path) -> None:
    """A path such as `tests/e2e/cluster/run.sh` in a page names a file or folder of this
    repository: when one moves, its pages say where it went."""
    missing = [
        path
        for path in REPO_PATH.findall(FENCE.sub("", page.read_text()))
        if not (ROOT / path).exists() and ROOT / path not in PENDING
    ]
    assert not missing, missing
