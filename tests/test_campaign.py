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


def test_campaign_on_an_open_client_leaves_it_open_and_is_deterministic():
    """A campaign on a client the caller owns (a cluster by address) reuses it; same seed, same result."""
    from distributed import Client, LocalCluster

    from acc_bluesky.commissioning import commission_seed, warm_worker

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        assert list(client.run(warm_worker, "ebs").values()) == ["ebs"]
        first = run_campaign("ebs", [2], client=client)
        assert client.status == "running"  # not closed by the campaign
        again = run_campaign("ebs", [2], client=client)
    local = commission_seed("ebs", 2)
    for key in ("iterations", "n_sv"):
        assert first[0][key] == again[0][key] == local[key], key
    for key in ("orbit_x_before", "orbit_x_after", "orbit_y_after", "max_corrector"):  # same to rounding
        assert first[0][key] == pytest.approx(local[key], rel=1e-6) == again[0][key], key
