"""A campaign from the full table: no stored beam between threading and the sextupole ramp does not end the seed
(both need none); a lost beam before a step that needs one still does. Truth from the twin (tests/profiles/hmba,
one HMBA cell, seed 13: two turns threaded onto an unstable one-turn map; the ramp finds the closed orbit at 0.75).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from acc_bluesky.commissioning.campaign import run_campaign

HMBA = str(Path(__file__).parent / "profiles" / "hmba" / "profile.yaml")
SEQ = """
name: first-turns
steps:
  - thread_first_turns: {}
    success: {transmission: 1.0}
  - ramp_sextupoles: {n_sv: 8}
    success: {beam: true}
  - measure_dispersion: {}
"""


def test_campaign_goes_from_threading_to_the_sextupole_ramp_without_a_stored_beam(session_catalog_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = run_campaign(HMBA, [13], SEQ, error_scale=1.0, local=True, progress=False, catalog=session_catalog_dir)
    seed = r.results[13]
    assert seed.initial["beam"] == 0.0  # no closed orbit at the full table
    thread, ramp, disp = seed.steps
    assert thread.status == "missed" and thread.truth["beam"] == 0.0  # two turns, no stored beam: goes on
    assert ramp.status == "ok" and ramp.truth["beam"] == 1.0, ramp.reason  # stored (sextupoles at 0.75)
    assert disp.status == "ok" and seed.reason == ""  # the chain ran to the end


def test_campaign_ends_the_seed_when_a_step_that_needs_beam_comes_without_one(session_catalog_dir):
    seq = SEQ.replace("  - ramp_sextupoles: {n_sv: 8}\n    success: {beam: true}\n", "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = run_campaign(HMBA, [13], seq, error_scale=1.0, local=True, progress=False, catalog=session_catalog_dir)
    seed = r.results[13]
    thread, disp = seed.steps
    assert thread.status == "missed" and disp.status == "not run"
    assert "beam lost after step thread_first_turns" in seed.reason
