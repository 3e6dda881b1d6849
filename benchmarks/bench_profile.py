"""``acc-bluesky profile new`` on a >= 4000-element lattice, printed beside pyAT's own load time of the same file.

DESIGN: <= 10 s on 2 cores for a 4000-element lattice. The lattice is SLS 2.0 (4677 elements, every magnet named
per device, 1082 Corrector elements of which 230 steer), from ``tests/lattices/``. Each run starts in a fresh
process (what the ``acc-bluesky profile new ...`` command runs), so the time includes the imports, the generation (families
by name stem and strength, BPMs, steerers), the error-scale search over 5 seeds, the YAML, the validation at load
and the report, exactly what a user waits for. pyAT's ``load_lattice`` of the same file is timed in a fresh process
too (imports included), and in process (the file only).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run"]

ROOT = Path(__file__).resolve().parents[1]
LATTICE = ROOT / "tests" / "lattices" / "sls2.json"


def _wall(cmd: list[str], env: dict, cpu: list[float] | None = None) -> float:
    """Wall time of ``cmd`` in a fresh process [s]; its CPU time (user + sys) appended to ``cpu``."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed: {proc.stderr[-2000:]}")
    return dt


def run(repeats: int = 3, lattice: Path = LATTICE) -> dict:
    import warnings

    import at

    warnings.simplefilter("ignore")
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    ring = at.load_lattice(str(lattice))
    load_in_process = time.perf_counter() - t0
    new, load, cpu_new = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for k in range(repeats):  # alternate, so both see the same machine load
            load.append(_wall([sys.executable, "-c", f"import at; at.load_lattice({str(lattice)!r})"], env))
            args = ["profile", "new", str(lattice), "-o", str(Path(d) / f"p{k}")]
            new.append(_wall([sys.executable, "-c", f"import sys; from acc_bluesky.cli import main; "
                              f"sys.exit(main({args!r}))"], env, cpu_new))  # what the acc-bluesky command runs
    best_new, best_load = min(new), min(load)
    out = {
        "elements": len(ring),
        "profile_new_s": round(best_new, 2),
        "profile_new_cpu_s": round(min(cpu_new), 2),
        "pyat_load_process_s": round(best_load, 2),
        "pyat_load_in_process_s": round(load_in_process, 3),
        "ratio": round(best_new / best_load, 2),
        "target": "profile new <= 10 s (4000+ elements, 2 cores)",
        "cpus": os.cpu_count(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }
    print(f"   {lattice.name}: {len(ring)} elements; profile new {best_new:.2f} s (best of {repeats}: "
          f"{', '.join(f'{x:.2f}' for x in new)}) beside pyAT load_lattice {best_load:.2f} s in a fresh process "
          f"({load_in_process:.3f} s for the file alone): ratio {best_new / best_load:.2f}; CPU of profile new "
          f"{min(cpu_new):.2f} s; load average "
          f"{out['load_average']}")
    return out


if __name__ == "__main__":
    print(run())
