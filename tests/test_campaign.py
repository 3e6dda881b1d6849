"""Dask campaign over error seeds on a real LocalCluster; truth from each seed's twin."""

from __future__ import annotations

import pytest

from acc_bluesky.cli.commission import parse_seeds
from acc_bluesky.commissioning import run_campaign


def test_campaign_on_a_local_cluster_corrects_every_seed():
    res = run_campaign("ebs", [1, 2, 3], n_workers=2)
    assert [r["seed"] for r in res] == [1, 2, 3]
    assert len({r["worker"] for r in res}) >= 1 and all(r["worker"].startswith("tcp://127.0.0.1") for r in res)
    for r in res:
        assert not r["beam_lost"]
        assert r["orbit_x_after"] < r["orbit_x_before"] / 10, r
        assert r["orbit_y_after"] < r["orbit_y_before"] / 5, r
        assert r["orbit_x_after"] < 100e-6 and r["orbit_y_after"] < 100e-6  # BPM offsets are 50 um rms
        assert r["max_corrector"] <= 8.0  # limits respected


def test_parse_seeds():
    assert parse_seeds("1-3,7, 9-10") == [1, 2, 3, 7, 9, 10]
    with pytest.raises(Exception, match="end before start"):
        parse_seeds("5-2")
