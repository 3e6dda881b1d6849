"""The device layer as Bluesky users expect it (issue: devices and API): physics units you can set, families you can
read, one name per device, positions, lookups, a Device tree, locate, watchable and stoppable moves.

On the small ring of ``tests/profiles/hmba`` (one EBS cell: 10 BPMs, 6 correctors per plane).
"""

from __future__ import annotations

from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import numpy as np
import pytest

HMBA = Path(__file__).parent / "profiles" / "hmba" / "profile.yaml"


@pytest.fixture(scope="module")
def hm():
    from acc_bluesky import connect

    return connect(HMBA, seed=1)


@pytest.fixture
def m(hm):
    hm.twin.reset()
    yield hm
    hm.twin.reset()


@pytest.fixture(scope="module")
def RE():  # noqa: N802 - bluesky's name
    from bluesky import RunEngine
    from bluesky.run_engine import get_bluesky_event_loop

    from acc_bluesky.machine import bluesky_loop

    bluesky_loop()
    return RunEngine(loop=get_bluesky_event_loop(), call_returns_result=True)


def _docs(RE, plan):  # noqa: N803
    docs: list[tuple[str, dict]] = []
    RE(plan, lambda name, doc: docs.append((name, doc)))
    return docs


def test_a_corrector_moves_in_radians_through_its_calibration(m, RE):  # noqa: N803
    from acc_bluesky.profile import LimitError

    c = m.hcor[3]
    RE(bps.mv(c.strength, 1e-5))
    cal = m.profile.families["HST"].spec.calibration
    assert m.twin.get_setpoint("HST", 3) == pytest.approx(float(cal.physics2hw(1e-5, m.profile.energy,
                                                                                 m.profile.energy)), rel=1e-12)
    assert m.twin.get_setpoint("HST", 3) == pytest.approx(0.2, rel=1e-12)  # 1e-5 rad / 5e-5 rad/A
    assert RE(bps.rd(c.strength)).plan_result == pytest.approx(1e-5, rel=1e-12)
    # a strength past the limit (8 A = 4e-4 rad) is refused before anything moves
    with pytest.raises(Exception) as info:
        RE(bps.mv(c.strength, 5e-4))
    assert any(isinstance(e, LimitError) for e in _chain(info.value)), info.value
    assert m.twin.get_setpoint("HST", 3) == pytest.approx(0.2, rel=1e-12)


def _chain(err):
    out, seen = [], set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", [])]
    return out


def test_families_are_readable_and_movable_in_both_units(m, RE):  # noqa: N803
    q = m.quad["QF4"]
    k = q.to_physics(np.array([310.0, 290.0, 290.0, 310.0]) * 0 + RE(bps.rd(q.setpoints)).plan_result) * 1.001
    RE(bps.mv(q.strengths, k))
    np.testing.assert_allclose(m.twin.get_setpoint("QF4"), q.to_hw(k), rtol=1e-12)
    np.testing.assert_allclose(m.twin.get_strength("QF4", truth=True) / (1 + np.array(
        [m.twin.errors.field.get(int(r), 0.0) for r in q.refpts])), k, rtol=1e-12)
    docs = _docs(RE, bp.count([m.hcor, q, m.bpm, m.tune]))
    desc = next(d for n, d in docs if n == "descriptor")["data_keys"]
    ev = next(d for n, d in docs if n == "event")["data"]
    for fam in ("HST", "QF4"):
        for key, unit in (("setpoints", "A"), ("readbacks", "A"), ("strengths", m.families[fam].physics_units)):
            assert desc[f"{fam}-{key}"]["units"] == unit and desc[f"{fam}-{key}"]["shape"] == [len(m.families[fam])]
            assert desc[f"{fam}-{key}"]["description"]
    np.testing.assert_allclose(ev["QF4-setpoints"], q.to_hw(k), rtol=1e-12)
    assert desc["bpm-x_rms"]["units"] == "m" and np.isfinite(ev["bpm-x_rms"])  # the scalar a live table shows
    hints = next(d for n, d in docs if n == "descriptor")["hints"]
    assert "bpm-x_rms" in hints["bpm"]["fields"] and "tune-x" in hints["tune"]["fields"]


def test_one_name_per_device_everywhere(m, RE):  # noqa: N803
    from acc_bluesky.devices import pv_names

    prof = m.profile
    names = prof.families["HST"].device_names
    assert m.hcor.names == names and [d.name for d in m.hcor.values()] == names
    c = m.hcor[names[2]]
    assert c is m.hcor[2] and c is m.device(names[2]) and c.name == names[2]
    docs = _docs(RE, bp.count([c]))
    keys = next(d for n, d in docs if n == "descriptor")["data_keys"]
    assert set(keys) == {names[2], f"{names[2]}-setpoint", f"{names[2]}-strength"}  # readback named as the device
    assert any(names[2] in pv for pv in pv_names(prof).values())  # the PV template uses the same name
    b = prof.bpm_names[4]
    assert m.bpm[b] is m.bpm[4] is m.bpm.channel[4] is m.device(b) and m.bpm[b].name == b
    assert m.device("QF4") is m.quad["QF4"] and m.device("rf") is m.rf
    from acc_bluesky.machine import NoSuchDevice

    with pytest.raises(NoSuchDevice, match=r"no device named 'HST_0x'"):
        m.device("HST_0x")
    with pytest.raises(KeyError, match=r"unknown device 'BPM_999'"):
        m.bpm["BPM_999"]
    with pytest.raises(KeyError, match=r"position 6 out of range 0..5"):
        m.hcor[6]


def test_every_device_knows_where_it_is(m):
    prof = m.profile
    s_all = np.asarray(prof.load_lattice().get_s_pos(range(len(prof.load_lattice()) + 1)))
    for fam in m.families.values():
        for i, dev in enumerate(fam.values()):
            assert dev.refpt == int(prof.families[fam.family_name].refpts[i])
            assert dev.s == pytest.approx(s_all[dev.refpt])
    np.testing.assert_allclose(m.bpm.s, s_all[m.bpm.refpts])
    assert m.bpm[3].s == pytest.approx(s_all[m.bpm.refpts[3]]) and m.bpm[3].refpt == int(m.bpm.refpts[3])
    assert np.all(np.diff(m.bpm.s) > 0)


def test_machine_is_a_device_tree_with_flat_names(m):
    from ophyd_async.core import Device

    children = dict(m.children())
    assert isinstance(m, Device) and {"bpm", "rf", "tune", "beam", "families"} <= set(children)
    assert set(dict(children["families"].children())) == set(m.families)
    assert m.bpm.name == "bpm" and m.quad["QF4"].name == "QF4" and m.bpm.x.name == "bpm-x"
    m.set_name("anything")  # the machine's own name does not prefix its devices' data keys
    assert m.name == "anything" and m.bpm.x.name == "bpm-x" and m.hcor[0].name == m.hcor.names[0]


async def test_init_devices_builds_and_connects_a_machine(hm):
    from ophyd_async.core import init_devices

    from acc_bluesky.devices import SimBackend
    from acc_bluesky.machine import Machine

    with init_devices():
        ring = Machine(hm.profile, "sim", SimBackend(hm.twin), hm.seed)
    assert ring.bpm.name == "bpm"  # named, yet its devices keep their names
    x = await ring.bpm.x.get_value()
    np.testing.assert_allclose(x, hm.twin.read_bpms()[0], atol=5e-6)


def test_locate_and_a_watched_move(m, RE):  # noqa: N803
    c = m.hcor[1]
    RE(bps.mv(c, 1.25))
    loc = RE(bps.locate(c)).plan_result
    assert loc["setpoint"] == pytest.approx(1.25) and loc["readback"] == pytest.approx(1.25)
    updates = []
    from bluesky.run_engine import call_in_bluesky_event_loop

    async def move():
        status = c.set(-0.5)
        status.watch(lambda **kw: updates.append(kw))
        await status
        return status

    status = call_in_bluesky_event_loop(move())
    assert status.success and updates, "a move reports its progress (what progress bars show)"
    assert updates[-1]["target"] == -0.5 and updates[-1]["name"] == c.name and updates[-1]["unit"] == "A"


def test_a_ramped_supply_is_followed_and_can_be_stopped(tmp_path, RE):  # noqa: N803
    import yaml

    from acc_bluesky import connect

    spec = yaml.safe_load(HMBA.read_text())
    spec["lattice"] = {"package": "machine_data", "file": "hmba.mat"}
    spec["families"]["QF4"]["ramp_rate"] = 400.0  # A/s: a 20 A step takes 50 ms
    p = tmp_path / "ramped" / "profile.yaml"
    p.parent.mkdir()
    p.write_text(yaml.safe_dump(spec))
    rm = connect(p, seed=None)
    q = rm.quad["QF4"][0]
    sp0 = rm.twin.get_setpoint("QF4", 0)
    updates = []
    RE(bps.mv(q, sp0 + 20.0), lambda *a: None)
    assert rm.twin.get_readback("QF4", 0) == pytest.approx(sp0 + 20.0, abs=q.tolerance)  # waited for the ramp
    from bluesky.run_engine import call_in_bluesky_event_loop

    async def stop_soon():
        import asyncio

        status = q.set(sp0 - 100.0)  # 300 ms of ramp (a loaded machine still sees its middle)
        status.watch(lambda **kw: updates.append(kw["current"]))
        while rm.twin.get_readback("QF4", 0) > sp0 - 30.0:  # stopped in the middle of the ramp
            await asyncio.sleep(0.002)
        await q.stop(success=False)
        try:
            await status
        except Exception:  # noqa: BLE001 - stopped: the status fails
            pass
        return status

    status = call_in_bluesky_event_loop(stop_soon())
    assert status.done and not status.success
    held = rm.twin.get_setpoint("QF4", 0)
    assert sp0 - 100.0 < held < sp0 + 20.0  # the setpoint went to where the supply was
    assert len(updates) >= 2  # the ramp was followed


def test_orm_figure_colour_bar_is_in_its_unit(machine_small_orm=None):
    from acc_bluesky.analysis import OrbitResponse

    r = OrbitResponse(matrix=np.full((4, 1), 12.0), matrix_hw=np.full((4, 1), 6e-4), bpm_names=["a", "b"],
                      corrector_names=["c"], planes=["x"])
    data, unit = r.plot_data()
    assert unit == "mm/mrad" and np.all(data == 12.0)  # 12 m/rad is 12 mm/mrad, not 12000
    data, unit = r.plot_data(hw=True)
    assert unit == "mm/A" and np.allclose(data, 0.6)


def test_the_live_table_shows_scalar_readings_with_units(m, RE):  # noqa: N803
    from acc_bluesky.data import LiveReadings

    lines: list[str] = []
    RE(bp.count([m.bpm, m.tune, m.beam], 2), LiveReadings(out=lines.append))
    head = lines[1]
    for col in ("bpm-x_rms [m]", "bpm-y_rms [m]", "tune-x", "tune-y", "beam-current [A]"):
        assert col in head, head
    rows = [ln for ln in lines[3:] if ln.startswith("|")]
    assert len(rows) == 2 and all(len(r.split("|")) == len(head.split("|")) for r in rows)
    x_rms = float(rows[0].split("|")[3])
    assert 1e-6 < x_rms < 1e-2  # an orbit rms in m
