"""`acc-bluesky demo` end to end: the virtual commissioning really commissions (truth from the twin)."""

from __future__ import annotations

import numpy as np
import pytest

import acc_bluesky.commissioning as commissioning
from acc_bluesky.cli import main
from acc_bluesky.data import open_catalog


@pytest.mark.parametrize("scale", [None, 1.0], ids=["profile-errors", "full-errors"])
def test_demo_commissions_the_ring(tmp_path, capsys, monkeypatch, scale, session_catalog_dir):
    """The demo on the profile's errors with BBA (``--full``), and on the whole alignment table (no closed orbit: it
    threads the first turns first, then the ring tools take over)."""
    results = []
    real = commissioning.run_demo

    def capture(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(commissioning, "run_demo", capture)
    cat_dir, out = session_catalog_dir, tmp_path / "fig"  # (runs found by uid: the session's catalogue)
    extra = ["--full"] if scale is None else ["--error-scale", str(scale)]  # --full: with BBA
    assert main(["demo", "--catalog-dir", str(cat_dir), "--out", str(out), "--no-progress", *extra]) == 0
    text = capsys.readouterr().out
    assert "rms orbit x (truth)" in text and "OrbitResponse.from_run" in text

    # physics: the twin's truth, not what the tools believe
    res = results[0]
    b, a = res.before, res.after
    if scale is None:
        assert a["orbit_x_rms"] < b["orbit_x_rms"] / 10 and a["orbit_y_rms"] < b["orbit_y_rms"] / 10
        assert "thread_first_turns" not in res.uids
    else:  # seed 1 at full errors: no closed orbit before; threaded, sextupole ramp (stored at full strength: one
        # correction), then corrected to 47 / 38 um (measured)
        assert not np.isfinite(b["orbit_x_rms"]) and "thread_first_turns" in res.uids and "ramp_sextupoles" in res.uids
        assert a["orbit_x_rms"] < 100e-6 and a["orbit_y_rms"] < 100e-6
    assert np.all(np.abs(a["tunes"] - np.asarray(a["tune_target"])) < 1e-3)
    assert np.all(np.abs(a["chrom"] - np.asarray(a["chrom_target"])) < 0.2)
    assert res.seconds["total"] < 300

    # pictures a physicist would rather look at
    for png in ("orbit_before_after.png", "orbit_response.png", "tune_diagram.png"):
        assert (out / png).stat().st_size > 10_000, png

    # every step is a FAIR run in the catalogue, findable by the uid printed
    cat = open_catalog(catalog_dir=cat_dir)
    assert len(res.uids) == (9 if scale is None else 8)
    tools = set()
    for uid in res.uids.values():
        assert uid in text
        md = cat[uid].metadata
        assert md["start"]["facility"] == "ESRF" and md["start"]["mode"] == "sim" and md["start"]["seed"] == 1
        assert md["stop"]["exit_status"] == "success"
        tools.add(md["start"]["tool"])
    assert len(tools) == len(res.uids) - (1 if scale is None else 0)  # (correct_orbit twice with --full)
