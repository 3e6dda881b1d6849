"""Devices through the sim backend (truth from the twin) and the epics backend with mock signals."""

from __future__ import annotations

import numpy as np
import pytest
from ophyd_async.core import init_devices
from ophyd_async.testing import get_mock_put, set_mock_value

from acc_bluesky.devices import EpicsBackend, MagnetFamily, Orbit, pv_names
from acc_bluesky.machine import connect
from acc_bluesky.profile import LimitError


async def test_orbit_reads_what_the_twin_bpms_show(machine_ideal):
    m = machine_ideal
    await m.hcor[12].set(2.0)
    x = await m.bpm.x.get_value()
    xt, _ = m.twin.orbit()
    assert np.array_equal(x, xt)  # ideal machine: BPM reading == truth
    assert np.max(np.abs(x)) > 1e-5
    reading = await m.bpm.channel[40].x.get_value()
    assert reading == x[40]


async def test_units_in_every_describe(machine):
    m = machine
    for dev in (m.bpm, m.hcor[0], m.quad["QF2"][0], m.rf, m.tune, m.beam):
        desc = await dev.describe()
        assert desc and all("units" in d for d in desc.values()), dev.name
        assert all(d.get("description") for d in desc.values()), (dev.name, desc)  # the physics meaning
    d = await m.bpm.describe()
    assert d["bpm-x"]["units"] == "m" and d["bpm-x"]["shape"] == [224]
    assert (await m.rf.describe())["rf-frequency"]["units"] == "Hz"
    name = m.hcor.names[0]
    desc = await m.hcor[0].describe()
    assert desc[name]["units"] == "A" and desc[f"{name}-setpoint"]["units"] == "A"  # readback named as the device
    assert desc[f"{name}-strength"]["units"] == "rad"


async def test_strength_in_physics_units(machine):
    m = machine
    await m.hcor[3].set(2.0)
    assert await m.hcor[3].strength.get_value() == pytest.approx(1e-4)
    qf2 = m.quad["QF2"][0]
    k = await qf2.strength.get_value()
    assert k == pytest.approx(0.39100749, rel=1e-9)  # design K of QF2 through the calibration
    assert qf2.to_hw(k) == pytest.approx(await qf2.readback.get_value())


async def test_setpoint_past_limit_refused_before_anything_moves(machine):
    m = machine
    before = m.twin.snapshot()
    with pytest.raises(LimitError, match=r"HST_006: setpoint 12 A is outside the limits"):
        await m.hcor[5].set(12.0)
    with pytest.raises(LimitError, match="HST"):
        await m.hcor.set(np.full(224, 9.0))
    after = m.twin.snapshot()
    assert np.array_equal(before["HST"], after["HST"])


async def test_family_waveform_sets_all_at_once(machine):
    m = machine
    n0 = m.twin.stats["solves"]
    values = np.linspace(-1, 1, 224)
    await m.vcor.set(values)
    assert np.array_equal(await m.vcor.readbacks.get_value(), values)
    await m.bpm.y.get_value()
    assert m.twin.stats["solves"] == n0 + 1
    assert np.array_equal(m.twin.get_setpoint("VST"), values)


def test_machine_tree(machine):
    m = machine
    assert isinstance(m.bpm, Orbit) and len(m.bpm) == 224
    assert isinstance(m.hcor, MagnetFamily) and len(m.hcor) == 224 and m.hcor.refpts.shape == (224,)
    assert m.hcor.names[0] == "HST_001" and m.vcor.family_name == "VST"
    assert set(m.quad) == {"QF2", "QD3", "QD4", "QF5", "QD6", "QF7"}
    assert set(m.sext) == {"S4", "S6", "S13", "S19", "S20", "S22", "S24"}
    assert m.twin is not None and m.mode == "sim" and m.seed == 1
    with pytest.raises(KeyError, match="unknown quadrupole family 'QF9'; valid: \\['QD3'"):
        m.quad["QF9"]
    with pytest.raises(KeyError, match="unknown device 'HST_999'"):
        m.hcor.index_of("HST_999")


async def test_beam_current_and_tunes(machine):
    m = machine
    assert 0.19 < await m.beam.current.get_value() <= 0.2
    qx = await m.tune.x.get_value()
    assert abs(qx - m.twin.tunes()[0]) < 1e-4
    m.twin.anomalies.lose_beam()
    assert await m.beam.current.get_value() == 0.0
    assert np.all(np.isnan(await m.bpm.x.get_value()))


async def test_rf_frequency_moves_energy(machine):
    m = machine
    f0 = await m.rf.frequency.get_value()
    dp0 = m.twin.energy_deviation()  # not 0: the errors change the path length
    await m.rf.set(f0 + 5.0)  # small step: linear in alpha (at 50 Hz, alpha_2 adds ~9 % on EBS)
    dp = m.twin.energy_deviation() - dp0
    import at

    alpha = at.get_mcf(m.twin.ring.deepcopy())  # of the errored ring (the design's differs by the errors)
    assert dp == pytest.approx(-5.0 / (f0 * alpha), rel=0.02)
    with pytest.raises(LimitError, match="rf.frequency"):
        await m.rf.set(f0 + 1e6)


def test_pv_names_from_templates(ebs):
    pvs = pv_names(ebs)
    assert pvs["HST:001:setpoint"] == "EBS-SIM:HST_001:I-SP"
    assert pvs["orbit:x"] == "EBS-SIM:ORBIT:X"
    assert pv_names(ebs, prefix="SR:")["BPM:224:y"] == "SR:BPM_224:Y"
    assert len(set(pvs.values())) == len(pvs)  # no two keys share a PV


async def test_epics_backend_devices_with_mock_signals(ebs):
    """Device logic of the epics backend, unit-tested with ophyd-async mock signals (no IOC)."""
    from acc_bluesky.machine import Machine

    backend = EpicsBackend(ebs, prefix="T:")
    async with init_devices(mock=True):
        m = Machine(ebs, "epics", backend, seed=None)
        for d in m.devices():
            await d.connect(mock=True)
    assert m.twin is None
    set_mock_value(m.bpm.x, np.arange(224) * 1e-6)
    assert (await m.bpm.x.get_value())[10] == pytest.approx(1e-5)
    await m.hcor[0].set(1.5)
    get_mock_put(m.hcor[0].setpoint).assert_called_once()
    assert m.hcor[0].setpoint.source.endswith("T:HST_001:I-SP")
    with pytest.raises(LimitError):
        await m.hcor[0].set(100.0)
    assert get_mock_put(m.hcor[0].setpoint).call_count == 1


def test_connect_bad_mode(ebs):
    with pytest.raises(ValueError, match="mode must be one of"):
        connect(ebs, mode="tine")


def test_standard_bluesky_plans_record_what_the_machine_shows(machine_ideal):
    """bluesky's own plans stage (and may monitor) their detectors: staged sim signals still ask the twin, so
    ``bp.count``/``bp.scan`` record the present orbit, tunes and current, never a stale cached value."""
    import bluesky.plans as bp
    from bluesky import RunEngine

    m = machine_ideal
    RE = RunEngine(call_returns_result=True)  # noqa: N806 - bluesky's name
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    m.twin.set_setpoint("HST", 2.0, 10)
    RE(bp.count([m.bpm, m.beam, m.tune], 2))
    events = [d for n, d in docs if n == "event"]
    assert len(events) == 2
    x_truth, _ = m.twin.orbit()
    assert np.array_equal(events[0]["data"]["bpm-x"], x_truth)  # ideal machine: BPM == truth
    assert events[0]["data"]["beam-current"] == pytest.approx(m.twin.beam_current(), rel=1e-4)  # decays slowly
    assert events[0]["data"]["tune-x"] == pytest.approx(m.twin.tunes()[0], abs=1e-12)
    docs.clear()
    RE(bp.scan([m.bpm], m.hcor[0], -2.0, 2.0, 3))
    events = [d for n, d in docs if n == "event"]
    seen = [np.asarray(e["data"]["bpm-x"]) for e in events]
    for kick, x in zip((-2.0, 0.0, 2.0), seen):
        m.twin.set_setpoint("HST", kick, 0)
        assert np.allclose(x, m.twin.orbit()[0], rtol=0, atol=1e-9), kick  # solver tolerance: 1 nm
    assert np.std(seen[2] - seen[0]) > 1e-5  # the scan moved the orbit


def test_unknown_device_keys_say_what_is_valid_and_names_work(machine_ideal):
    m = machine_ideal
    assert m.hcor["HST_003"] is m.hcor[2] and m.bpm.channel["BPM_005"] is m.bpm.channel[4]
    with pytest.raises(KeyError, match=r"HST: position 999 out of range 0..223 \(or give a device name"):
        m.hcor[999]
    with pytest.raises(KeyError, match=r"BPM: position 300 out of range 0..223"):
        m.bpm.channel[300]


async def test_a_family_put_past_a_limit_names_the_first_offender(machine_ideal):
    m = machine_ideal
    sp = np.zeros(224)
    sp[[10, 20]] = [9.0, -12.0]
    with pytest.raises(LimitError, match=r"HST HST_011 \(and 1 more\): setpoint 9 A is outside the limits \[-8, 8\]"):
        await m.hcor.set(sp)
    assert np.all(m.twin.get_setpoint("HST") == 0.0)  # nothing moved
