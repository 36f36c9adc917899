"""Run every ``benchmarks/bench_*.py`` (or those named), print figures, write JSON.

Usage: ``python -m benchmarks.run [NAME ...]`` (``make bench``). Results go to
``benchmarks/results/<name>.json`` and a combined ``benchmarks/results/all.json``.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    names = argv if argv is not None else sys.argv[1:]
    pkg = Path(__file__).resolve().parent
    available = sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules([str(pkg)])
        if m.name.startswith("bench_")
    )
    chosen = names or available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    combined: dict[str, object] = {}
    for name in chosen:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        t0 = time.perf_counter()
        result = mod.main()
        result["wall_seconds"] = round(time.perf_counter() - t0, 2)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
        combined[name] = result
        print(f"== {name}: {json.dumps(result, indent=2, default=str)}")
    (RESULTS / "all.json").write_text(json.dumps(combined, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
