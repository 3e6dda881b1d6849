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


def _heading_signatures(name: str) -> list[str]:
    """The argument lists of the docs' headings that document the plan ``name(...)`` (e.g. ``## `measure_orm(machine,
    ...)```; not ``analysis.name(...)``, a function of the same name)."""
    import re

    found = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for line in page.read_text().splitlines():
            if not line.startswith("#"):
                continue
            m = re.search(rf"`([\w.]*\.)?{name}\((.*)\)`", line)
            if m and (m.group(1) or "") in ("", "plans.", "ap.", "acc_bluesky.plans."):  # not analysis functions
                found.append(m.group(2))
    return found


def _split_args(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def test_documented_signatures_are_the_plans():
    """Every plan heading in the docs lists the plan's parameters, in order, with the code's defaults."""
    import ast
    import inspect

    import acc_bluesky.plans as ap

    wrong = []
    for name in ap.__all__:
        fn = getattr(ap, name)
        if not callable(fn):
            continue
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
        for doc in _heading_signatures(name):
            args = [a for a in _split_args(doc) if a not in ("*", "/")]
            names = [a.split("=", 1)[0].strip() for a in args]
            if names != [p.name for p in params]:
                wrong.append(f"{name}: docs ({', '.join(names)}) != code ({', '.join(p.name for p in params)})")
                continue
            for a, p in zip(args, params):
                if "=" not in a:
                    if p.default is not p.empty:
                        wrong.append(f"{name}: {p.name} has the default {p.default!r} in the code, none in the docs")
                    continue
                text = a.split("=", 1)[1].strip()
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    continue  # a name or an expression: not compared
                if value != p.default:
                    wrong.append(f"{name}: {p.name}={text} in the docs, {p.default!r} in the code")
    assert not wrong, "\n".join(wrong)
