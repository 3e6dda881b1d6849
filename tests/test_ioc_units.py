"""IOC building blocks that need no EPICS: commands, one-turn tunes, the observer, names, the CLI parsers, the
autosave file and the PV list."""

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


def test_commands_take_device_names_or_one_based_numbers(twin):
    prof = twin.profile
    c = parse_command("dead_bpm 5", twin)
    assert (c.verb, c.index, c.on, c.device) == ("dead_bpm", 4, True, prof.bpm_names[4])
    assert parse_command(f"dead_bpm {prof.bpm_names[-1]} off", twin).index == len(prof.bpm_names) - 1
    hst5 = prof.families["HST"].device_names[4]
    assert parse_command(f"dead {hst5}", twin) == parse_command("dead HST 5", twin)
    assert parse_command(f"dead {hst5.lower()}", twin).device == hst5
    c = parse_command("stuck VST 10 off", twin)
    assert (c.family, c.index, c.on) == ("VST", 9, False)
    assert c.describe() == f"stuck {prof.families['VST'].device_names[9]} off"
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
        assert apply_command(twin, parse_command("dead_bpm 3", twin)) == f"ok: dead_bpm {twin.profile.bpm_names[2]}"
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
    from acc_bluesky.devices import pv_names
    from acc_bluesky.ioc import bpm_pv, magnet_pv, orbit_rms_pv_names

    assert twin_pv_names(ebs)["cmd"] == "EBS-SIM:TWIN:CMD"
    assert twin_pv_names(ebs, "X:")["published"] == "X:TWIN:PUBLISHED"
    assert twin_pv_names(ebs, "X:")["heartbeat"] == "X:TWIN:HEARTBEAT"
    t = pv_names(ebs, "X:")
    assert orbit_rms_pv_names(ebs, "X:")["orbit:y_rms"] == t["orbit:y"] + "-RMS"
    assert magnet_pv(t, ebs, "QF2", 3, "readback") in t.values()
    assert bpm_pv(t, ebs, 0, "x") != bpm_pv(t, ebs, 1, "x")
    with pytest.raises(KeyError, match="no readback PV of"):
        magnet_pv({}, ebs, "QF2", 3, "readback")
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
    assert (a.allow_faults, a.autosave, a.pv_list) == (False, None, None)
    a = parser.parse_args(["ioc", "ebs", "--allow-faults", "--autosave", "s.json", "--pv-list", "pvs.csv"])
    assert (a.allow_faults, a.autosave, a.pv_list) == (True, "s.json", "pvs.csv")
    b = parser.parse_args(["shadow", "ebs", "--shadow-prefix", "S:", "--orbit-threshold", "1e-5"])
    assert (b.shadow_prefix, b.orbit_threshold, b.seed) == ("S:", 1e-5, -1) and callable(b.func)


def test_ioc_refuses_pv_names_epics_cannot_serve(twin):
    from acc_bluesky.ioc.server import TwinIoc

    with pytest.raises(ValueError, match=r"PV name 'A-VERY-LONG-PREFIX\S+' \(key '[^']+'\) is not a valid EPICS record "
                                         r"name: at most 60 characters, no blanks\. Shorten the prefix"):
        TwinIoc(twin, prefix="A-VERY-LONG-PREFIX-OF-A-FACILITY-THAT-LIKES-LONG-NAMES:")
    with pytest.raises(ValueError, match="max_rate must be > 0"):
        TwinIoc(twin, max_rate=0)
    ioc = TwinIoc(twin, prefix="OK:")
    assert ioc.pvs["orbit:x"] == "OK:ORBIT:X" and "cmd" not in ioc.tpvs  # no fault injection unless allowed
    assert TwinIoc(twin, prefix="OK:", allow_faults=True).tpvs["cmd"] == "OK:TWIN:CMD"
    with pytest.raises(ValueError, match="autosave_period must be > 0"):
        TwinIoc(twin, autosave="x.json", autosave_period=0)


def test_autosave_round_trip_is_exact(twin, tmp_path):
    from acc_bluesky.ioc.autosave import load, restore, save, snapshot
    from acc_bluesky.twin import Twin

    try:
        twin.set_setpoint("HST", 1.0 / 3.0, 5)
        twin.set_setpoint("QD3", twin.get_setpoint("QD3") * (1 + 1e-4))
        twin.set_rf_frequency(twin.rf_frequency_setpoint + 12.5)
        path = save(tmp_path / "s.json", snapshot(twin))
        assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary file left
        other = Twin("ebs", seed=None)
        assert restore(other, load(path, twin.profile)) == sum(len(f) for f in twin.profile.families.values()) + 2
        for fam in twin.family_names:
            assert np.array_equal(other.get_setpoint(fam), twin.get_setpoint(fam)), fam
        assert other.rf_frequency_setpoint == twin.rf_frequency_setpoint
        assert other.rf_voltage_setpoint == twin.rf_voltage_setpoint
    finally:
        twin.reset()


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="other/1"), r"format: expected 'acc_bluesky.ioc.autosave/1', got 'other/1'"),
    (lambda d: d.update(profile="als"), r"profile: saved for profile 'als', this IOC serves 'ebs'"),
    (lambda d: d["families"].update(QX9={"setpoints": [0.0]}), r"families.QX9: unknown family; this profile has"),
    (lambda d: d["families"]["HST"].update(setpoints=[0.0] * 3),
     r"families.HST.setpoints: 3 values, the family has 224 magnets"),
    (lambda d: d["families"]["HST"]["setpoints"].__setitem__(9, 11.0),
     r"families.HST.setpoints: HST \S+: setpoint 11 A is outside the limits \[-8, 8\] A\. Fix the file"),
    (lambda d: d["families"]["HST"]["setpoints"].__setitem__(9, float("nan")), r"is not a finite number"),
    (lambda d: d["families"]["HST"].update(setpoints="zero"), r"families.HST.setpoints: expected a list of numbers"),
    (lambda d: d["rf"].update(frequency=1.0), r"rf.frequency: RF frequency: setpoint 1 Hz is outside the limits"),
    (lambda d: d["rf"].update(voltage=None), r"rf.voltage: expected a finite number \[V\], got None"),
])
def test_a_bad_autosave_file_is_refused_naming_file_and_key(twin, tmp_path, edit, match):
    import json

    from acc_bluesky.ioc.autosave import AutosaveError, load, snapshot

    data = snapshot(twin)
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AutosaveError, match=match) as info:
        load(path, twin.profile)
    assert str(path) in str(info.value) and "nothing was restored" in str(info.value)


def test_autosave_file_that_is_not_json(twin, tmp_path):
    from acc_bluesky.ioc.autosave import AutosaveError, load

    path = tmp_path / "cut.json"
    path.write_text('{"format": "acc_bluesky.ioc.autosave/1", "fam')
    with pytest.raises(AutosaveError, match=r"cut.json: line 1: not valid JSON"):
        load(path, twin.profile)


def test_pv_list_csv_and_plain_names(tmp_path):
    from acc_bluesky.ioc.autosave import PvRow, read_pv_list, write_pv_list

    rows = [PvRow("P:HST:001:I-SP", "ao", "A", "HST:001 S4, setpoint", "setpoint"),
            PvRow("P:TWIN:FAN1", "fanout", "", "internal", "internal")]
    assert read_pv_list(write_pv_list(tmp_path / "pvs.csv", rows)) == rows  # quoting: DESC with a comma
    assert (tmp_path / "pvs.csv").read_text().splitlines()[0] == "pv,record_type,units,description,kind"
    assert write_pv_list(tmp_path / "pvs.txt", rows).read_text() == "P:HST:001:I-SP\nP:TWIN:FAN1\n"
