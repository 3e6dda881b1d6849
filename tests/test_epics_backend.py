"""``connect(profile, mode="epics")`` on the twin IOC: the same devices, read and moved through Channel Access.

Truth: a local twin with the IOC's seed and setpoints (noise-free BPM transform) and pyepics on the same PVs.
"""

from __future__ import annotations

import shutil
import time

import bluesky.plan_stubs as bps
import bluesky.plans as bp
from bluesky.utils import FailedStatus
import numpy as np
import pytest
import yaml
from ioc_fixtures import *  # noqa: F403
from ioc_fixtures import PORTS, PREFIX, IocProcess, caget

from acc_bluesky.profile import LimitError
from acc_bluesky.twin import Twin

TOL = 7e-7  # 7 sigma of the 1e-7 m BPM noise


@pytest.fixture(scope="module")
def plain_RE():  # noqa: N802 - the bluesky name
    """A RunEngine without Tiled, for reading and moving (opening a catalogue costs seconds)."""
    from bluesky import RunEngine

    return RunEngine(call_returns_result=True, context_managers=[])


@pytest.fixture(scope="module")
def tiled_RE(session_catalog_dir):  # noqa: N802
    """The project's RunEngine on the session's catalogue for the module, and the catalogue."""
    from acc_bluesky.data import make_run_engine, open_catalog

    d = session_catalog_dir
    return make_run_engine(catalog_dir=d, progress=False), open_catalog(catalog_dir=d)


def expected(**setpoints) -> tuple[np.ndarray, np.ndarray]:
    t = Twin("ebs", seed=1)
    for fam, d in setpoints.items():
        for i, v in d.items():
            t.set_setpoint(fam, v, i)
    return t.errors.bpm_transform(*t.orbit())


def rd(RE, *signals):
    def plan():
        out = []
        for s in signals:
            out.append((yield from bps.rd(s)))
        return out

    return RE(plan()).plan_result


def test_orbit_through_the_devices_is_the_twins(reset_ioc, ioc_machine, plain_RE):
    m = ioc_machine
    assert m.mode == "epics" and m.twin is None and len(m.bpm) == 224
    x, y, xb = rd(plain_RE, m.bpm.x, m.bpm.y, m.bpm.channel[100].x)
    xe, ye = expected()
    assert np.max(np.abs(x - xe)) < TOL and np.max(np.abs(y - ye)) < TOL
    assert xb == pytest.approx(xe[100], abs=TOL)


def test_corrector_set_through_the_device_moves_the_orbit(reset_ioc, ioc_machine, plain_RE):
    m = ioc_machine
    p = reset_ioc.pvs

    def plan():
        yield from bps.mv(m.hcor[10], 1.5, m.vcor[20], -0.5)
        return (yield from bps.rd(m.bpm.x)), (yield from bps.rd(m.bpm.y)), (yield from bps.rd(m.hcor[10].strength))

    x, y, kick = plain_RE(plan()).plan_result
    xe, ye = expected(HST={10: 1.5}, VST={20: -0.5})
    assert np.max(np.abs(x - xe)) < TOL and np.max(np.abs(y - ye)) < TOL
    assert kick == pytest.approx(1.5 * 5e-5)
    # pyepics sees the same PVs
    assert caget(p["HST:011:setpoint"]) == 1.5 and caget(p["VST:021:readback"]) == -0.5
    assert np.max(np.abs(np.asarray(caget(p["orbit:x"])) - xe)) < TOL


def test_family_set_and_quadrupole_strength(reset_ioc, ioc_machine, plain_RE):
    m = ioc_machine
    sp = np.zeros(224)
    sp[[5, 50, 150]] = [0.3, -0.4, 0.2]
    qf2 = m.quad["QF2"]

    def plan():
        yield from bps.mv(m.vcor, sp)
        k0 = yield from bps.rd(qf2[0].strength)
        i0 = yield from bps.rd(qf2[0].readback)
        yield from bps.mv(qf2[0], i0 * 1.001)
        return (yield from bps.rd(m.vcor.readbacks)), (yield from bps.rd(m.bpm.y)), k0, i0, \
            (yield from bps.rd(qf2[0].strength))

    rb, y, k0, i0, k1 = plain_RE(plan()).plan_result
    assert np.array_equal(rb, sp)
    t = Twin("ebs", seed=1)
    t.set_setpoint("VST", sp)
    t.set_setpoint("QF2", i0 * 1.001, 0)
    assert np.max(np.abs(y - t.errors.bpm_transform(*t.orbit())[1])) < TOL
    assert k0 == pytest.approx(t.design[int(t.family("QF2").refpts[0])].PolynomB[1], rel=1e-9)
    assert k1 == pytest.approx(k0 * 1.001, rel=1e-9)


def test_device_refuses_out_of_limits_before_any_put(reset_ioc, ioc_machine, plain_RE):
    m = ioc_machine
    tp = reset_ioc.tpvs
    n0 = int(caget(tp["refused"]))
    with pytest.raises(FailedStatus, match=r"HST_004: setpoint 9 A is outside the limits \[-8, 8\] A") as info:
        plain_RE(bps.mv(m.hcor[3], 9.0))
    assert isinstance(info.value.__cause__, LimitError)
    with pytest.raises(FailedStatus, match=r"frequency: setpoint 3.53e\+08 Hz is outside the limits") as info:
        plain_RE(bps.mv(m.rf, 353.0e6))
    assert isinstance(info.value.__cause__, LimitError)
    assert caget(reset_ioc.pvs["HST:004:setpoint"]) == 0.0
    assert int(caget(tp["refused"])) == n0  # nothing reached the IOC


def test_describe_carries_units_and_limits(ioc_machine):
    from bluesky.run_engine import call_in_bluesky_event_loop  # the devices live on the bluesky loop

    m = ioc_machine
    d = call_in_bluesky_event_loop(m.hcor[0].setpoint.describe())
    key = next(iter(d.values()))
    assert key["units"] == "A" and key["source"] == f"ca://{PREFIX}HST_001:I-SP"
    lim = key["limits"]["control"]
    assert lim["low"] == pytest.approx(-8.0, abs=1e-12) and lim["high"] == pytest.approx(8.0, abs=1e-12)
    assert key["limits"]["display"] == {"low": -8.0, "high": 8.0}
    d = call_in_bluesky_event_loop(m.bpm.describe())
    assert d["bpm-x"]["units"] == "m" and d["bpm-x"]["shape"] == [224]


def test_count_of_the_orbit_goes_to_tiled(reset_ioc, ioc_machine, tiled_RE):
    from acc_bluesky.data import read_stream, tool_metadata

    RE, catalog = tiled_RE
    m = ioc_machine
    uid = RE(bp.count([m.bpm, m.tune, m.beam], num=3, md=tool_metadata("orbit_readout", m)))
    run = catalog[uid]
    assert run.metadata["start"]["mode"] == "epics" and run.metadata["stop"]["exit_status"] == "success"
    data = read_stream(run)
    x = np.asarray(data["bpm-x"])
    assert x.shape == (3, 224)
    xe, _ = expected()
    assert np.max(np.abs(x - xe)) < TOL
    assert np.all(np.abs(np.asarray(data["tune-x"]) - Twin("ebs", seed=1).tunes()[0]) < 7e-5)


def test_a_pv_that_never_connects_is_named_within_the_timeout(twin_ioc, tmp_path):
    from acc_bluesky.machine import connect
    from acc_bluesky.profile import load_profile

    src = load_profile("ebs").path
    spec = yaml.safe_load(src.read_text())
    spec["families"]["QF2"]["pv"] = {"readbacks": "{prefix}QF2:NO-SUCH-RB"}
    path = tmp_path / "ebs_broken" / "profile.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    for extra in src.parent.glob("*.py"):
        shutil.copy(extra, path.parent)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        connect(str(path), mode="epics", prefix=twin_ioc.prefix, timeout=5.0)  # ~2300 PVs: room on a busy host
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert f"{PREFIX}QF2:NO-SUCH-RB" in msg and "QF2" in msg and "within 5.0 s" in msg, msg
    assert "HST" not in msg, msg  # only what did not connect is named
    assert elapsed < 30, elapsed  # the 5 s timeout (plus building ~2300 signals), never a hang


# ---------------------------------------------------------------------------------------------------------
# the IOC dies in the middle of a plan
@pytest.fixture
def fault_ioc():
    proc = IocProcess(["serve", "ebs", "--seed", "1", "--prefix", "FLT" + PREFIX], PORTS["fault"], "fault_ioc")
    proc.start()
    proc.prefix = "FLT" + PREFIX
    try:
        yield proc
    finally:
        proc.stop()


def _chain(err: BaseException) -> list[BaseException]:
    """The exception, its causes and contexts (depth first, each once)."""
    out, todo, seen = [], [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def test_ioc_killed_mid_plan_fails_the_run_keeps_data_and_names_the_pvs(fault_ioc, tiled_RE):
    import threading

    from acc_bluesky.data import read_stream
    from acc_bluesky.devices.backends.epics import PvUnreachable
    from acc_bluesky.machine import connect
    from acc_bluesky.plan_stubs.machine import RestoreError
    from acc_bluesky.plans import measure_orm

    RE, catalog = tiled_RE
    m = connect("ebs", mode="epics", prefix=fault_ioc.prefix, timeout=3.0)
    starts, events = [], []

    def on_doc(name, doc):
        if name == "start":
            starts.append(doc["uid"])
        elif name == "event":
            events.append(doc)
            if len(events) == 4:  # the IOC crashes once 4 correctors are measured
                threading.Thread(target=fault_ioc.kill).start()

    token = RE.subscribe(on_doc)
    t0 = time.monotonic()
    try:
        with pytest.raises(Exception) as info:
            RE(measure_orm(m, correctors=[f"HST_{i:03d}" for i in range(1, 41)]))
    finally:
        RE.unsubscribe(token)
    elapsed = time.monotonic() - t0
    chain = _chain(info.value)
    print(f"error after {elapsed:.1f} s: {[(type(e).__name__, str(e)[:150]) for e in chain]}")
    # the error raised names a PV of the dead IOC and says so; every PV error of the chain is on that IOC (the
    # measurement's put or read, then the restore's, when it ran: see docs/ioc.md)
    top = info.value
    assert isinstance(top, (PvUnreachable, FailedStatus, RestoreError)), repr(top)
    assert fault_ioc.prefix in str(top) and "down or unreachable" in str(top), str(top)
    unreachable = [e for e in chain if isinstance(e, PvUnreachable)]
    assert unreachable and all(pv.startswith(fault_ioc.prefix) for e in unreachable for pv in e.pvs)
    # what could not be put back is reported: every snapshot item was tried, each failure names its PV and target
    restore = [e for e in chain if isinstance(e, RestoreError)]
    assert restore, "the restore failures are not reported"
    failed = restore[0].failed
    assert "HST" in failed and failed["HST"][1] == f"{fault_ioc.prefix}HST:I-SP", failed
    assert np.array_equal(failed["HST"][0], np.zeros(224))  # the setpoints it should have: the snapshot's
    assert all(src.startswith(fault_ioc.prefix) for _, src, _ in failed.values())
    assert elapsed < 60
    # the run is closed as failed, naming the PV, with the events measured before the crash
    run = catalog[starts[0]]
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "fail" and fault_ioc.prefix in stop["reason"], stop
    data = read_stream(run)
    assert np.asarray(data["orm-orbit_plus"]).shape[0] >= 4
    assert np.all(np.isfinite(np.asarray(data["orm-orbit_plus"])[:4]))
