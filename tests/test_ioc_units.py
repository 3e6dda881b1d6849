"""IOC building blocks that need no EPICS: commands, one-turn tunes, the observer, names, the CLI parsers."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from acc_bluesky.ioc import (
    CommandError,
    Observer,
    apply_command,
    one_turn_tunes,
    parse_command,
    shadow_pv_names,
    twin_pv_names,
)


@pytest.fixture(scope="module")
def twin():
    from acc_bluesky.twin import Twin

    return Twin("ebs", seed=1)


def test_commands_parse_one_based_names(twin):
    c = parse_command("dead_bpm 5", twin)
    assert (c.verb, c.index, c.on) == ("dead_bpm", 4, True)
    assert parse_command("dead_bpm BPM:224 off", twin).index == 223
    assert parse_command("dead HST:005", twin) == parse_command("dead HST 5", twin)
    c = parse_command("stuck VST:010 off", twin)
    assert (c.family, c.index, c.on) == ("VST", 9, False)
    assert parse_command("trip QF2", twin).family == "QF2"
    assert parse_command("  CLEAR ", twin).verb == "clear"


@pytest.mark.parametrize("text, match", [
    ("", "empty command"),
    ("explode", "unknown command 'explode'"),
    ("dead_bpm 0", r"out of range 1\.\.224"),
    ("dead_bpm 225", r"out of range 1\.\.224"),
    ("dead HST 300", r"out of range 1\.\.224"),
    ("dead QX1 3", "unknown family 'QX1'; valid families"),
    ("trip QF2 3", "trip takes a family only"),
    ("lose_beam now", "takes no argument"),
    ("dead HST", "needs FAMILY N"),
    ("dead_bpm five", "expected a 1-based number"),
])
def test_bad_commands_say_what_is_valid(twin, text, match):
    with pytest.raises(CommandError, match=match):
        parse_command(text, twin)


def test_apply_command_drives_the_anomalies(twin):
    try:
        assert apply_command(twin, parse_command("dead_bpm 3", twin)) == "ok: dead_bpm BPM:003"
        assert np.isnan(twin.read_bpms()[0][2])
        apply_command(twin, parse_command("trip QD3", twin))
        assert np.all(twin.get_readback("QD3") == 0)
        apply_command(twin, parse_command("clear", twin))
        assert twin.anomalies.active()["tripped"] == [] and np.isfinite(twin.read_bpms()[0][2])
    finally:
        twin.reset()


def test_one_turn_tunes_equal_the_twins_optics(twin):
    try:
        for k, (fam, i, dv) in enumerate([("QF2", 0, 0.5), ("QD3", 5, -0.8), ("HST", 10, 2.0), ("S4", 3, 5.0)]):
            twin.set_setpoint(fam, twin.get_setpoint(fam, i) + dv, i)
            twin.read_bpms()
            q = one_turn_tunes(twin)
            assert np.allclose(q, twin.tunes(), atol=1e-8), (k, q, twin.tunes())
        twin.anomalies.lose_beam()
        assert np.all(np.isnan(one_turn_tunes(twin)))
    finally:
        twin.reset()


def test_observer_recomputes_only_on_change(twin):
    obs = Observer(twin)
    a = obs.observe()
    s = twin.stats["solves"]
    b = obs.observe()
    assert not b.changed and twin.stats["solves"] == s
    assert not np.array_equal(a.x, b.x)  # fresh BPM noise
    assert np.allclose(a.x, b.x, atol=1e-6)
    assert b.tunes[0] != a.tunes[0] and abs(b.tunes[0] - a.tunes[0]) < 1e-4  # fresh tune noise
    twin.set_setpoint("HST", 1.0, 0)
    try:
        c = obs.observe()
        assert c.changed and twin.stats["solves"] == s + 1
        assert c.setpoints["HST"][0] == 1.0 and c.readbacks["HST"][0] == 1.0
    finally:
        twin.reset()


def test_names_use_the_prefix(ebs):
    assert twin_pv_names(ebs)["cmd"] == "EBS-SIM:TWIN:CMD"
    assert twin_pv_names(ebs, "X:")["published"] == "X:TWIN:PUBLISHED"
    s = shadow_pv_names(ebs)
    assert s["anomaly"] == "EBS-SIM:SHADOW:ANOMALY"
    assert shadow_pv_names(ebs, "SH:")["orbit:x_residual"] == "SH:ORBIT:X-RESID"
    assert shadow_pv_names(ebs, prefix="P:")["anomaly"] == "P:SHADOW:ANOMALY"


def test_cli_parsers():
    from acc_bluesky.cli import ioc as cli_ioc
    from acc_bluesky.cli import shadow as cli_shadow

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli_ioc.add_parser(sub)
    cli_shadow.add_parser(sub)
    a = parser.parse_args(["ioc", "ebs", "--prefix", "P:", "--seed", "3", "--port", "6000", "--max-rate", "20"])
    assert (a.profile, a.prefix, a.seed, a.port, a.max_rate) == ("ebs", "P:", 3, 6000, 20.0) and callable(a.func)
    b = parser.parse_args(["shadow", "ebs", "--shadow-prefix", "S:", "--orbit-threshold", "1e-5"])
    assert (b.shadow_prefix, b.orbit_threshold, b.seed) == ("S:", 1e-5, -1) and callable(b.func)


def test_ioc_refuses_pv_names_epics_cannot_serve(twin):
    from acc_bluesky.ioc.server import TwinIoc

    with pytest.raises(ValueError, match=r"is not a valid EPICS record name: at most 60 characters.*key 'HST:001:setpoint'|"
                                         r"key 'HST:001:setpoint'.*at most 60 characters"):
        TwinIoc(twin, prefix="A-VERY-LONG-PREFIX-OF-A-FACILITY-THAT-LIKES-LONG-NAMES:")
    with pytest.raises(ValueError, match="max_rate must be > 0"):
        TwinIoc(twin, max_rate=0)
    ioc = TwinIoc(twin, prefix="OK:")
    assert ioc.pvs["orbit:x"] == "OK:ORBIT:X" and ioc.tpvs["cmd"] == "OK:TWIN:CMD"
