"""Docs: Sphinx builds, and every plan has a page that documents it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_plan_is_documented():
    import acc_bluesky.plans as ap

    pages = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    missing = [name for name in ap.__all__ if f"{name}(" not in pages and f"`{name}`" not in pages]
    assert not missing, f"plans without a docs page: {missing}"


def test_sphinx_builds(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "index.html").exists()
    errors = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln or "CRITICAL" in ln]
    assert not errors, "\n".join(errors[:20])
