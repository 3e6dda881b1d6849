"""The twin served as an EPICS IOC, seen through pyepics (``caget``/``caput``) on loopback.

Ground truth: a local twin with the same seed and setpoints gives the same closed orbit, so the IOC's orbit PV must
equal the local twin's noise-free BPM reading within the BPM noise (1e-7 m rms; 7 sigma for the max of 224).
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
from ioc_fixtures import *  # noqa: F403
from ioc_fixtures import PORTS, IocProcess, caget, caput

from acc_bluesky.twin import Twin

NOISE = 1e-7  # m rms of the EBS profile's BPMs
TOL = 7 * NOISE


def local_twin(**setpoints) -> Twin:
    """A twin with seed 1 (the IOC's) and the given setpoints {family: {index: value}}."""
    t = Twin("ebs", seed=1)
    for fam, d in setpoints.items():
        for i, v in d.items():
            t.set_setpoint(fam, v, i)
    return t


def expected_bpms(t: Twin) -> tuple[np.ndarray, np.ndarray]:
    return t.errors.bpm_transform(*t.orbit())


def orbit(pvs) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(caget(pvs["orbit:x"])), np.asarray(caget(pvs["orbit:y"]))


def test_every_pv_of_the_table_is_served_with_units(twin_ioc):
    import epics

    assert "records=" in twin_ioc.proc.ready_line
    n = int(twin_ioc.proc.ready_line.split("records=")[1].split()[0])
    assert n >= len(twin_ioc.pvs)  # every table PV + fanouts + the twin's own PVs
    names = list(twin_ioc.pvs.values())
    values = epics.caget_many(names, timeout=20)
    missing = [pv for pv, v in zip(names, values) if v is None]
    assert not missing, f"{len(missing)} PVs not served, e.g. {missing[:5]}"
    p = twin_ioc.pvs
    assert caget(p["HST:001:setpoint"] + ".EGU") == "A"
    assert caget(p["BPM:224:y"] + ".EGU") == "m"
    assert caget(p["orbit:x"] + ".NELM") == 224
    assert caget(p["rf:frequency"] + ".EGU") == "Hz"
    assert caget(p["QF2:001:setpoint"] + ".HOPR") == 150.0
    assert caget(p["HST:001:setpoint"] + ".DRVH") == pytest.approx(8.0, abs=1e-12)
    assert caget(p["HST:001:setpoint"] + ".DRVL") == pytest.approx(-8.0, abs=1e-12)


def test_orbit_tunes_and_beam_are_the_twins(reset_ioc):
    p = reset_ioc.pvs
    t = local_twin()
    xm, ym = orbit(p)
    xe, ye = expected_bpms(t)
    assert np.max(np.abs(xm - xe)) < TOL and np.max(np.abs(ym - ye)) < TOL
    assert np.std(xe) > 1e-5  # the errored machine has a real orbit to compare
    # per-BPM PVs are elements of the waveform (same publication unless an idle refresh came between)
    assert caget(p["BPM:001:x"]) == pytest.approx(xe[0], abs=TOL)
    assert caget(p["BPM:224:y"]) == pytest.approx(ye[223], abs=TOL)
    q = np.array([caget(p["tune:x"]), caget(p["tune:y"])])
    assert np.max(np.abs(q - t.tunes())) < 7e-5  # tune noise 1e-5 rms
    assert caget(p["beam:current"]) == pytest.approx(0.2, rel=1e-3)
    assert caget(p["rf:frequency_rb"]) == pytest.approx(t.rf_frequency_setpoint, abs=1e-3)


def test_put_updates_the_orbit_before_completing(reset_ioc):
    p, tp = reset_ioc.pvs, reset_ioc.tpvs
    x0, _ = orbit(p)
    caput(p["HST:011:setpoint"], 1.5)  # returns once the orbit PVs show the new state
    x1, y1 = orbit(p)
    t = local_twin(HST={10: 1.5})
    xe, ye = expected_bpms(t)
    assert np.std(x1 - x0) > 50e-6  # 75 urad: a large change
    assert np.max(np.abs(x1 - xe)) < TOL and np.max(np.abs(y1 - ye)) < TOL
    # mirrors: single readback, family setpoints/readbacks
    assert caget(p["HST:011:readback"]) == 1.5
    assert caget(p["HST:setpoints"])[10] == 1.5
    assert caget(p["HST:readbacks"])[10] == 1.5
    # a family put sets every magnet at once and shows on the single PVs
    sp = np.zeros(224)
    sp[[3, 100]] = [0.5, -0.7]
    caput(p["VST:setpoints"], sp)
    assert caget(p["VST:004:setpoint"]) == 0.5 and caget(p["VST:101:readback"]) == -0.7
    t.set_setpoint("VST", sp)
    xe, ye = expected_bpms(t)
    x2, y2 = orbit(p)
    assert np.max(np.abs(y2 - ye)) < TOL and np.max(np.abs(x2 - xe)) < TOL
    assert int(caget(tp["version"])) > 0


def test_monitors_see_family_puts_on_single_setpoints(reset_ioc):
    import epics

    p = reset_ioc.pvs
    seen: list[float] = []
    pv = epics.PV(p["QF5:007:setpoint"], callback=lambda value=None, **_: seen.append(float(value)))
    assert pv.wait_for_connection(10)
    try:
        time.sleep(0.3)
        design = np.asarray(caget(p["QF5:setpoints"]))
        new = design.copy()
        new[6] *= 1.001
        caput(p["QF5:setpoints"], new)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and new[6] not in seen:
            time.sleep(0.05)
        assert new[6] in seen, f"no monitor update for the single setpoint: {seen}"
    finally:
        pv.clear_callbacks()
        pv.disconnect()


def test_out_of_limit_puts_are_refused_by_the_ioc(reset_ioc):
    p, tp = reset_ioc.pvs, reset_ioc.tpvs
    caput(p["HST:005:setpoint"], 2.0)
    n0 = int(caget(tp["refused"]))
    v0 = int(caget(tp["version"]))
    x0, _ = orbit(p)
    caput(p["HST:005:setpoint"], 9.0)  # beyond +8 A: the record clamps, validate refuses
    assert caget(p["HST:005:setpoint"]) == 2.0
    assert caget(p["HST:005:readback"]) == 2.0
    msg = caget(tp["last_error"], as_string=True)
    assert p["HST:005:setpoint"] in msg and "[-8, 8] A" in msg and "refused" in msg
    caput(p["HST:005:setpoint"], -8.5)
    assert caget(p["HST:005:setpoint"]) == 2.0
    # a family put with one value out of range, or of the wrong length
    sp = np.zeros(224)
    sp[7] = 12.0
    caput(p["HST:setpoints"], sp)
    assert caget(p["HST:setpoints"])[4] == 2.0 and caget(p["HST:008:setpoint"]) == 0.0
    caput(p["HST:setpoints"], np.zeros(10))
    assert len(caget(p["HST:setpoints"])) == 224
    assert "expected exactly 224" in caget(tp["last_error"], as_string=True)
    # RF beyond its limits
    f0 = caget(p["rf:frequency"])
    caput(p["rf:frequency"], 353e6)
    assert caget(p["rf:frequency"]) == f0
    # the counter record is updated from the refusing put's validation, asynchronously to that put's completion
    deadline = time.monotonic() + 5
    while int(caget(tp["refused"])) < n0 + 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert int(caget(tp["refused"])) == n0 + 5
    assert int(caget(tp["version"])) == v0  # nothing reached the twin
    x1, _ = orbit(p)
    assert np.max(np.abs(x1 - x0)) < TOL
    # the exact limit is legal
    caput(p["HST:005:setpoint"], 8.0)
    assert caget(p["HST:005:readback"]) == 8.0


def test_many_puts_one_recomputation_and_none_when_idle(reset_ioc):
    import epics

    p, tp = reset_ioc.pvs, reset_ioc.tpvs
    s0 = int(caget(tp["solves"]))
    idx = np.arange(0, 224, 7)  # 32 correctors
    vals = np.linspace(-1.0, 1.0, idx.size)
    chans = [epics.PV(p[f"VST:{i + 1:03d}:setpoint"]) for i in idx]
    for c in chans:
        assert c.wait_for_connection(10)
    for c, v in zip(chans, vals):
        c.put(float(v), wait=False)
    caput(p["HST:001:setpoint"], 0.25)  # completes after everything before it was published
    s1 = int(caget(tp["solves"]))
    assert 1 <= s1 - s0 <= idx.size // 4, f"{s1 - s0} solves for {idx.size + 1} puts"
    t = local_twin(VST=dict(zip(idx.tolist(), vals.tolist())), HST={0: 0.25})
    xe, ye = expected_bpms(t)
    x, y = orbit(p)
    assert np.max(np.abs(y - ye)) < TOL and np.max(np.abs(x - xe)) < TOL
    # idle: the BPMs are republished (fresh noise) but nothing is recomputed
    n0 = int(caget(tp["published"]))
    time.sleep(1.6)
    assert int(caget(tp["published"])) >= n0 + 2
    assert int(caget(tp["solves"])) == s1
    for c in chans:
        c.disconnect()


def test_lost_beam_gives_nan_with_invalid_alarms(reset_ioc):
    p, tp = reset_ioc.pvs, reset_ioc.tpvs
    assert reset_ioc.command("dead_bpm 5") == "ok: dead_bpm BPM:005"
    assert np.isnan(caget(p["BPM:005:x"])) and caget(p["BPM:005:x"] + ".SEVR", as_string=True) == "INVALID"
    assert np.isfinite(caget(p["BPM:004:x"])) and caget(p["BPM:004:x"] + ".SEVR", as_string=True) == "NO_ALARM"
    assert caget(p["orbit:x"] + ".SEVR", as_string=True) == "MINOR"
    assert reset_ioc.command("lose_beam") == "ok: lose_beam"
    x, y = orbit(p)
    assert np.all(np.isnan(x)) and np.all(np.isnan(y))
    for key in ("orbit:x", "orbit:y", "BPM:001:x", "BPM:224:y", "tune:x", "tune:y"):
        assert caget(p[key] + ".SEVR", as_string=True) == "INVALID", key
    assert np.isnan(caget(p["tune:x"]))
    assert caget(p["beam:current"]) == 0.0
    assert caget(tp["beam_lost"]) == 1
    active = json.loads(caget(tp["anomalies"], as_string=True))
    assert active["beam_lost"] is True and active["dead_bpms"] == [4]
    assert reset_ioc.command("inject") == "ok: inject"
    assert caget(p["orbit:x"] + ".SEVR", as_string=True) == "MINOR"  # BPM 5 is still dead
    assert reset_ioc.command("clear") == "ok: clear"
    assert caget(p["orbit:x"] + ".SEVR", as_string=True) == "NO_ALARM"
    assert caget(p["tune:x"] + ".SEVR", as_string=True) == "NO_ALARM" and np.isfinite(caget(p["tune:x"]))
    assert caget(p["beam:current"]) > 0.19


def test_commands_drive_supply_anomalies(reset_ioc):
    p, tp = reset_ioc.pvs, reset_ioc.tpvs
    caput(p["HST:005:setpoint"], 2.0)
    assert reset_ioc.command("dead HST:005") == "ok: dead HST:005"
    assert caget(p["HST:005:readback"]) == 0.0 and caget(p["HST:005:setpoint"]) == 2.0
    t = local_twin(HST={4: 2.0})
    t.anomalies.dead("HST", 4)
    xe, _ = expected_bpms(t)
    assert np.max(np.abs(orbit(p)[0] - xe)) < TOL  # the machine lost the kick
    assert reset_ioc.command("trip QF2") == "ok: trip QF2"
    assert np.all(np.asarray(caget(p["QF2:readbacks"])) == 0.0)
    assert json.loads(caget(tp["anomalies"], as_string=True))["tripped"] == ["QF2"]
    assert reset_ioc.command("trip QF2 off") == "ok: trip QF2 off"
    assert caget(p["QF2:001:readback"]) == pytest.approx(t.get_setpoint("QF2", 0), rel=1e-6) != 0.0
    n0 = int(caget(tp["refused"]))
    caput(tp["cmd"], "trip QX9")
    assert "unknown family 'QX9'" in caget(tp["cmd_result"], as_string=True)
    assert int(caget(tp["refused"])) == n0 + 1
    assert reset_ioc.command("stuck VST 3") == "ok: stuck VST:003"
    caput(p["VST:003:setpoint"], 1.0)
    assert caget(p["VST:003:readback"]) == 0.0  # the supply ignores the new setpoint


def test_sigterm_stops_the_ioc_cleanly_and_pva_is_served():
    port = PORTS["spare"]
    proc = IocProcess(["serve", "ebs", "--seed", "-1", "--prefix", "SPARE:", "--pva", "--pva-port",
                       str(port + 1000)], port, "spare_ioc")
    try:
        proc.start()
        assert "pva=on" in proc.ready_line and "seed=None" in proc.ready_line
        assert caget("SPARE:TWIN:SEED") == -1
        with socket.create_connection(("127.0.0.1", port + 1000), timeout=5):
            pass  # the PV Access server listens
    finally:
        code = proc.stop()
    assert code == 0, proc.log()[-2000:]
    assert "IOC stopped" in proc.log()
