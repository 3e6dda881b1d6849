"""The twin served as an EPICS IOC, seen through pyepics (``caget``/``caput``) on loopback (the session IOC, with
fault injection allowed). What other clients see of a refused put, the PV list, autosave and an IOC without fault
injection: ``test_ioc_clients.py``.

Ground truth: a local twin with the same seed and setpoints gives the same closed orbit, so the IOC's orbit PV must
equal the local twin's noise-free BPM reading within the BPM noise (1e-7 m rms; 7 sigma for the max of 224).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from ioc_fixtures import *  # noqa: F403
from ioc_fixtures import caget, caput

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


def sevr(pv: str) -> str:
    return caget(pv + ".SEVR", as_string=True)


def test_every_pv_of_the_table_is_served_with_units_desc_and_ranges(twin_ioc):
    import epics

    h = twin_ioc
    n = int(h.proc.ready_line.split("records=")[1].split()[0])
    assert n >= len(h.pvs)  # every table PV + fanouts + the twin's own PVs
    names = list(h.pvs.values()) + list(h.opvs.values()) + list(h.tpvs.values())
    values = epics.caget_many(names, timeout=20)
    missing = [pv for pv, v in zip(names, values) if v is None]
    assert not missing, f"{len(missing)} PVs not served, e.g. {missing[:5]}"
    assert caget(h.sp("HST", 0) + ".EGU") == "A"
    assert caget(h.bpm(-1, "y") + ".EGU") == "m"
    assert caget(h.pvs["orbit:x"] + ".NELM") == 224
    assert caget(h.pvs["rf:frequency"] + ".EGU") == "Hz"
    assert caget(h.sp("QF2", 0) + ".HOPR") == 150.0
    assert caget(h.sp("HST", 0) + ".DRVH") == pytest.approx(8.0, abs=1e-12)
    assert caget(h.sp("HST", 0) + ".DRVL") == pytest.approx(-8.0, abs=1e-12)
    # DESC and a display range on every kind of record (single magnets, tunes, beam, RF, orbit, BPMs, rms)
    ranged = [h.sp("HST", 3), h.rb("QF2", 1), h.pvs["QD3:setpoints"], h.pvs["tune:x"], h.pvs["beam:current"],
              h.pvs["beam:lifetime"], h.pvs["rf:frequency"], h.pvs["rf:frequency_rb"], h.pvs["rf:voltage"],
              h.pvs["orbit:y"], h.bpm(7, "x"), h.opvs["orbit:x_rms"], h.tpvs["cycle_time"]]
    descs = epics.caget_many([pv + ".DESC" for pv in ranged + [h.tpvs["beam_lost"]]], as_string=True, timeout=10)
    assert all(descs), dict(zip(ranged, descs))
    lo = epics.caget_many([pv + ".LOPR" for pv in ranged], timeout=10)
    hi = epics.caget_many([pv + ".HOPR" for pv in ranged], timeout=10)
    assert all(b > a for a, b in zip(lo, hi)), {pv: (a, b) for pv, a, b in zip(ranged, lo, hi)}
    assert caget(h.bpm(7, "x") + ".HOPR") == h.profile.spec.beam.aperture_x  # BPMs: the aperture
    assert h.device("HST", 3) in caget(h.sp("HST", 3) + ".DESC", as_string=True)
    # the profile's alarm limits
    al = h.profile.spec.controls.alarms
    assert caget(h.pvs["beam:current"] + ".LOLO") == al.beam_current.lolo
    assert caget(h.pvs["beam:current"] + ".LLSV", as_string=True) == "MAJOR"
    assert caget(h.pvs["beam:lifetime"] + ".LOW") == al.beam_lifetime.low
    assert caget(h.opvs["orbit:y_rms"] + ".HIHI") == al.orbit_rms_y.hihi
    assert caget(h.opvs["orbit:y_rms"] + ".HHSV", as_string=True) == "MAJOR"


def test_orbit_tunes_and_beam_are_the_twins(reset_ioc):
    h, p = reset_ioc, reset_ioc.pvs
    t = local_twin()
    xm, ym = orbit(p)
    xe, ye = expected_bpms(t)
    assert np.max(np.abs(xm - xe)) < TOL and np.max(np.abs(ym - ye)) < TOL
    assert np.std(xe) > 1e-5  # the errored machine has a real orbit to compare
    # per-BPM PVs are elements of the waveform (same publication unless an idle refresh came between)
    assert caget(h.bpm(0, "x")) == pytest.approx(xe[0], abs=TOL)
    assert caget(h.bpm(-1, "y")) == pytest.approx(ye[-1], abs=TOL)
    # rms over the BPMs (fresh noise at every publication: within the noise)
    assert caget(h.opvs["orbit:x_rms"]) == pytest.approx(np.sqrt(np.mean(xe ** 2)), abs=TOL)
    assert caget(h.opvs["orbit:y_rms"]) == pytest.approx(np.sqrt(np.mean(ye ** 2)), abs=TOL)
    q = np.array([caget(p["tune:x"]), caget(p["tune:y"])])
    assert np.max(np.abs(q - t.tunes())) < 7e-5  # tune noise 1e-5 rms
    assert caget(p["beam:current"]) == pytest.approx(0.2, rel=1e-3)
    assert sevr(p["beam:current"]) == "NO_ALARM" and sevr(h.opvs["orbit:x_rms"]) == "NO_ALARM"
    assert caget(p["rf:frequency_rb"]) == pytest.approx(t.rf_frequency_setpoint, abs=1e-3)


def test_put_updates_the_orbit_before_completing(reset_ioc):
    h, p, tp = reset_ioc, reset_ioc.pvs, reset_ioc.tpvs
    x0, _ = orbit(p)
    caput(h.sp("HST", 10), 1.5)  # returns once the orbit PVs show the new state
    x1, y1 = orbit(p)
    t = local_twin(HST={10: 1.5})
    xe, ye = expected_bpms(t)
    assert np.std(x1 - x0) > 50e-6  # 75 urad: a large change
    assert np.max(np.abs(x1 - xe)) < TOL and np.max(np.abs(y1 - ye)) < TOL
    # mirrors: single readback, family setpoints/readbacks
    assert caget(h.rb("HST", 10)) == 1.5
    assert caget(p["HST:setpoints"])[10] == 1.5
    assert caget(p["HST:readbacks"])[10] == 1.5
    # a family put sets every magnet at once and shows on the single PVs
    sp = np.zeros(224)
    sp[[3, 100]] = [0.5, -0.7]
    caput(p["VST:setpoints"], sp)
    assert caget(h.sp("VST", 3)) == 0.5 and caget(h.rb("VST", 100)) == -0.7
    t.set_setpoint("VST", sp)
    xe, ye = expected_bpms(t)
    x2, y2 = orbit(p)
    assert np.max(np.abs(y2 - ye)) < TOL and np.max(np.abs(x2 - xe)) < TOL
    assert int(caget(tp["version"])) > 0


def test_monitors_see_family_puts_on_single_setpoints(reset_ioc):
    import epics

    h, p = reset_ioc, reset_ioc.pvs
    seen: list[float] = []
    pv = epics.PV(h.sp("QF5", 6), callback=lambda value=None, **_: seen.append(float(value)))
    assert pv.wait_for_connection(10)
    try:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:  # the first monitor event
            time.sleep(0.02)
        design = np.asarray(caget(p["QF5:setpoints"]))
        new = design.copy()
        new[6] *= 1.001
        caput(p["QF5:setpoints"], new)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and new[6] not in seen:
            time.sleep(0.02)
        assert new[6] in seen, f"no monitor update for the single setpoint: {seen}"
    finally:
        pv.clear_callbacks()
        pv.disconnect()


def test_out_of_limit_puts_are_refused_with_an_alarm_until_the_next_good_put(reset_ioc):
    h, p, tp = reset_ioc, reset_ioc.pvs, reset_ioc.tpvs
    sp5 = h.sp("HST", 4)
    caput(sp5, 2.0)
    n0 = int(caget(tp["refused"]))
    v0 = int(caget(tp["version"]))
    x0, _ = orbit(p)
    caput(sp5, 9.0)  # beyond +8 A: the record clamps, validate refuses (pyepics' caput ignores the put status)
    assert caget(sp5) == 2.0 and caget(h.rb("HST", 4)) == 2.0
    assert (sevr(sp5), caget(sp5 + ".STAT", as_string=True)) == ("MINOR", "HWLIMIT")
    msg = caget(tp["last_error"], as_string=True)
    assert sp5 in msg and "[-8, 8] A" in msg and "refused" in msg
    caput(sp5, -8.5)
    caput(sp5, float("nan"))  # not a number: refused, WRITE alarm (not the UDF INVALID of an undefined value)
    assert caget(sp5) == 2.0
    assert (sevr(sp5), caget(sp5 + ".STAT", as_string=True)) == ("MINOR", "WRITE")
    # a family put with one value out of range, or of the wrong length
    sp = np.zeros(224)
    sp[7] = 12.0
    caput(p["HST:setpoints"], sp)
    assert caget(p["HST:setpoints"])[4] == 2.0 and caget(h.sp("HST", 7)) == 0.0
    assert sevr(p["HST:setpoints"]) == "MINOR" and h.device("HST", 7) in caget(tp["last_error"], as_string=True)
    caput(p["HST:setpoints"], np.zeros(10))
    assert len(caget(p["HST:setpoints"])) == 224
    assert "expected exactly 224" in caget(tp["last_error"], as_string=True)
    # RF beyond its limits
    f0 = caget(p["rf:frequency"])
    caput(p["rf:frequency"], 353e6)
    assert caget(p["rf:frequency"]) == f0 and sevr(p["rf:frequency"]) == "MINOR"
    # the counter record is updated from the refusing put's validation, asynchronously to that put's completion
    deadline = time.monotonic() + 5
    while int(caget(tp["refused"])) < n0 + 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert int(caget(tp["refused"])) == n0 + 6
    assert int(caget(tp["version"])) == v0  # nothing reached the twin
    x1, _ = orbit(p)
    assert np.max(np.abs(x1 - x0)) < TOL
    # the exact limit is legal, and the next good put clears the alarm
    assert sevr(sp5) == "MINOR"
    caput(sp5, 8.0)
    assert caget(h.rb("HST", 4)) == 8.0 and sevr(sp5) == "NO_ALARM"
    caput(p["rf:frequency"], f0)
    assert sevr(p["rf:frequency"]) == "NO_ALARM"


def test_a_put_equal_to_the_shown_value_reaches_the_twin_while_the_other_record_is_pending(reset_ioc):
    """The race of earlier sessions: a single-magnet put equal to what its record shows, sent right behind a family
    put to the same magnet (not yet published), completed at once and never reached the twin. Now every put is
    applied, in the order the records processed them, and the records then show the twin."""
    import epics

    h, p = reset_ioc, reset_ioc.pvs
    i = 5
    shown = caget(h.sp("VST", i))
    fam = np.asarray(caget(p["VST:setpoints"]))
    fam[i] = shown + 1.0
    epics.caput(p["VST:setpoints"], fam, wait=False)  # pending: its publication takes milliseconds
    caput(h.sp("VST", i), shown)  # the same value the record shows
    assert caget(h.rb("VST", i)) == shown and caget(p["VST:setpoints"])[i] == shown
    assert caget(h.sp("VST", i)) == shown
    # and the other way round: a family put equal to what the family record shows, behind a single put
    before = np.asarray(caget(p["VST:setpoints"]))
    epics.caput(h.sp("VST", i), shown + 0.5, wait=False)
    caput(p["VST:setpoints"], before)
    assert np.array_equal(caget(p["VST:readbacks"]), before)
    assert caget(h.sp("VST", i)) == before[i]
    xe, ye = expected_bpms(local_twin(VST=dict(enumerate(before.tolist()))))
    x, y = orbit(p)
    assert np.max(np.abs(y - ye)) < TOL and np.max(np.abs(x - xe)) < TOL


def test_many_puts_one_recomputation_and_none_when_idle(reset_ioc):
    import epics

    h, p, tp = reset_ioc, reset_ioc.pvs, reset_ioc.tpvs
    s0 = int(caget(tp["solves"]))
    idx = np.arange(0, 224, 7)  # 32 correctors
    vals = np.linspace(-1.0, 1.0, idx.size)
    chans = [epics.PV(h.sp("VST", i)) for i in idx]
    for c in chans:
        assert c.wait_for_connection(10)
    for c, v in zip(chans, vals):
        c.put(float(v), wait=False)
    caput(h.sp("HST", 0), 0.25)  # completes after everything before it was published
    s1 = int(caget(tp["solves"]))
    assert 1 <= s1 - s0 <= idx.size // 4, f"{s1 - s0} solves for {idx.size + 1} puts"
    t = local_twin(VST=dict(zip(idx.tolist(), vals.tolist())), HST={0: 0.25})
    xe, ye = expected_bpms(t)
    x, y = orbit(p)
    assert np.max(np.abs(y - ye)) < TOL and np.max(np.abs(x - xe)) < TOL
    assert np.array_equal(np.asarray(caget(p["VST:setpoints"]))[idx], vals)
    # idle: the BPMs are republished (fresh noise) but nothing is recomputed
    n0 = int(caget(tp["published"]))
    time.sleep(1.6)
    assert int(caget(tp["published"])) >= n0 + 2
    assert int(caget(tp["solves"])) == s1
    for c in chans:
        c.disconnect()


def test_lost_beam_gives_nan_with_invalid_alarms_and_a_major_current_alarm(reset_ioc):
    h, p, tp = reset_ioc, reset_ioc.pvs, reset_ioc.tpvs
    bpm5 = h.profile.bpm_names[4]
    assert reset_ioc.command("dead_bpm 5") == f"ok: dead_bpm {bpm5}"
    assert np.isnan(caget(h.bpm(4, "x"))) and sevr(h.bpm(4, "x")) == "INVALID"
    assert np.isfinite(caget(h.bpm(3, "x"))) and sevr(h.bpm(3, "x")) == "NO_ALARM"
    assert sevr(p["orbit:x"]) == "MINOR"
    assert reset_ioc.command("lose_beam") == "ok: lose_beam"
    x, y = orbit(p)
    assert np.all(np.isnan(x)) and np.all(np.isnan(y))
    for pv in (p["orbit:x"], p["orbit:y"], h.bpm(0, "x"), h.bpm(-1, "y"), p["tune:x"], p["tune:y"],
               h.opvs["orbit:x_rms"], p["beam:lifetime"]):
        assert sevr(pv) == "INVALID", pv
    assert np.isnan(caget(p["tune:x"])) and np.isnan(caget(h.opvs["orbit:y_rms"]))
    assert caget(p["beam:current"]) == 0.0
    assert (sevr(p["beam:current"]), caget(p["beam:current"] + ".STAT", as_string=True)) == ("MAJOR", "LOLO")
    assert caget(tp["beam_lost"]) == 1
    active = json.loads(caget(tp["anomalies"], as_string=True))
    assert active["beam_lost"] is True and active["dead_bpms"] == [4]
    assert reset_ioc.command("inject") == "ok: inject"
    assert sevr(p["orbit:x"]) == "MINOR"  # BPM 5 is still dead
    assert sevr(p["beam:current"]) == "NO_ALARM"
    assert reset_ioc.command("clear") == "ok: clear"
    assert sevr(p["orbit:x"]) == "NO_ALARM"
    assert sevr(p["tune:x"]) == "NO_ALARM" and np.isfinite(caget(p["tune:x"]))
    assert caget(p["beam:current"]) > 0.19


def test_commands_drive_supply_anomalies(reset_ioc):
    h, p, tp = reset_ioc, reset_ioc.pvs, reset_ioc.tpvs
    hst5 = h.device("HST", 4)
    caput(h.sp("HST", 4), 2.0)
    assert reset_ioc.command(f"dead {hst5}") == f"ok: dead {hst5}"
    assert caget(h.rb("HST", 4)) == 0.0 and caget(h.sp("HST", 4)) == 2.0
    t = local_twin(HST={4: 2.0})
    t.anomalies.dead("HST", 4)
    xe, _ = expected_bpms(t)
    assert np.max(np.abs(orbit(p)[0] - xe)) < TOL  # the machine lost the kick
    assert reset_ioc.command("trip QF2") == "ok: trip QF2"
    assert np.all(np.asarray(caget(p["QF2:readbacks"])) == 0.0)
    assert json.loads(caget(tp["anomalies"], as_string=True))["tripped"] == ["QF2"]
    assert reset_ioc.command("trip QF2 off") == "ok: trip QF2 off"
    assert caget(h.rb("QF2", 0)) == pytest.approx(t.get_setpoint("QF2", 0), rel=1e-6) != 0.0
    n0 = int(caget(tp["refused"]))
    caput(tp["cmd"], "trip QX9")
    assert "unknown family 'QX9'" in caget(tp["cmd_result"], as_string=True)
    assert int(caget(tp["refused"])) == n0 + 1 and sevr(tp["cmd"]) == "MINOR"
    assert reset_ioc.command("stuck VST 3") == f"ok: stuck {h.device('VST', 2)}"
    caput(h.sp("VST", 2), 1.0)
    assert caget(h.rb("VST", 2)) == 0.0  # the supply ignores the new setpoint
