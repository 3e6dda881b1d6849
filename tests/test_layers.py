"""The layers of DESIGN.md, enforced with import-linter (twin/analysis/profile never import bluesky)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe, "--no-cache", str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " kept, 0 broken." in proc.stdout  # (every contract of pyproject.toml)


def test_twin_imports_without_bluesky():
    code = ("import sys; import acc_bluesky, acc_bluesky.twin, acc_bluesky.profile, acc_bluesky.analysis; "
            "t = acc_bluesky.twin.Twin('ebs'); t.orbit(); "
            "bad = [m for m in ('bluesky', 'ophyd_async', 'tiled') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
