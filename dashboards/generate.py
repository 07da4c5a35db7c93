"""Write every dashboard as JSON into the Helm chart; `--check` fails if a committed file is stale.

python -m dashboards.generate          # regenerate
python -m dashboards.generate --check  # exit 1 if the committed JSON differs
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dashboards import overview, slo

OUT = Path(__file__).resolve().parents[1] / "deploy/helm/pricestream/files/dashboards"
DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "pricestream-overview.json": overview.build,
    "pricestream-slo.json": slo.build,
}


def render(build: Callable[[], dict[str, Any]]) -> str:
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path, text = OUT / name, render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run `make dashboards`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
