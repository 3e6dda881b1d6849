"""Run the benchmarks and print DESIGN's ratios side by side: ``python benchmarks/run.py [name ...]``.

Each ``bench_<name>.py`` has ``run() -> dict`` with a ``ratio`` (or several ``*ratio*`` keys) and a ``target``.
Absolute times are for information only: the ratios are measured side by side in the same run.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    names = argv or sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    results = {}
    for name in names:
        mod = importlib.import_module(f"bench_{name}")
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = mod.run()
        except Exception as err:  # noqa: BLE001 - report and go on with the others
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"   FAILED: {err}")
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    print("\nSummary (ratios; lower is better unless the target says >=):")
    for name, r in results.items():
        ratios = {k: v for k, v in r.items() if "ratio" in k or k.startswith("share_") or k in ("target",
                                                                        "p95_ms", "rate_hz", "speedup")}
        print(f"  {name:20s} " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in ratios.items()) + ("  ERROR " + r["error"] if "error" in r else ""))
    (HERE / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
