"""Every orbit/config plan puts back exactly what it changed when interrupted at a random step (seeded): an
exception thrown into the plan, a pause then ``RE.abort()``, a pause then ``RE.stop()``. The twin's snapshot
(every family's setpoints and the RF) is compared with exact equality. And a measurement that loses the beam
midway fails with a clear error, restores the correctors, and its run is in the catalogue (exit status fail,
partial data kept)."""

from __future__ import annotations


import numpy as np
import pytest

from acc_bluesky.data import read_stream
from acc_bluesky.plan_stubs.machine import BeamLostError
from helpers import Interrupt, draw_step, run_interrupted, same
from acc_bluesky.plans import (
    correct_orbit,
    measure_dispersion,
    measure_orm,
    orbit_bump,
    restore_config,
    save_config,
)

ORM_SUBSET = ["HST_010", "HST_011", "HST_012", "VST_010", "VST_011", "VST_012"]


def _changed_config(m):
    """A configuration to restore that differs from the machine's (a corrector, a quadrupole and the RF)."""
    cfg = m.twin.snapshot()
    cfg["HST"] = cfg["HST"].copy()
    cfg["HST"][3] = 0.5
    cfg["QF2"] = cfg["QF2"] * 1.0005
    cfg["RF:frequency"] = cfg["RF:frequency"] + 5.0
    return cfg


# plan factory; range of steps (``set`` messages and event ``save``s, in the plan's order) where the
# interruption is drawn (seeded per plan and mode), chosen so that something has moved before it
PLANS = {
    "measure_orm": (lambda m: measure_orm(m, correctors=ORM_SUBSET, rf=True), (3, 14)),
    "correct_orbit": (lambda m: correct_orbit(m, orm="model", fit_rf=True, figure_dir=False), (4, 8)),
    "orbit_bump": (lambda m: orbit_bump(m, 10, 1e-3, plane="x"), (8, 20)),
    "measure_dispersion": (lambda m: measure_dispersion(m, n_steps=2), (2, 6)),
    "restore_config": (lambda m: restore_config(m, _changed_config(m)), (5, 5)),
}


def _k(name: str, mode: str) -> int:
    return draw_step(name, mode, *PLANS[name][1])


@pytest.mark.parametrize("name", list(PLANS))
def test_interrupted_plan_restores_every_setpoint(name, machine, RE):
    """The three interruptions one after the other on the same machine: each must leave it exactly as found."""
    make, _ = PLANS[name]
    before = machine.twin.snapshot()
    stops = []
    RE.subscribe(lambda n, d: stops.append(d) if n == "stop" else None)
    for mode in ("exception", "abort", "stop"):
        k = _k(name, mode)
        hook = Interrupt(machine, k, RuntimeError("injected fault") if mode == "exception" else "pause")
        run_interrupted(RE, hook, make(machine), mode, lambda: stops)
        assert hook.fired, f"{name} ended before step {k}"
        assert hook.changed, f"{name}: nothing had moved before step {k}: the test would prove nothing"
        assert same(machine.twin.snapshot(), before), f"{name}: not restored exactly after {mode} at step {k}"


def test_beam_lost_midway_through_an_orm(machine, RE, catalog):
    twin = machine.twin
    before = twin.snapshot()
    stops = []
    RE.subscribe(lambda n, d: stops.append(d) if n == "stop" else None)
    names = [f"HST_{i:03d}" for i in range(1, 9)]
    hook = Interrupt(machine, 5, twin.anomalies.lose_beam)  # lost at the 5th step (column, event, ...): 2 measured
    with pytest.raises(BeamLostError, match="beam lost while stepping HST_003.*all 224 in-service BPMs read NaN"
                                            ".*restores every setpoint") as err:
        RE(hook(measure_orm(machine, correctors=names)))
    assert len(err.value.bpms) == 224
    assert same(twin.snapshot(), before)  # correctors restored although the beam is gone
    stop = stops[-1]
    assert stop["exit_status"] == "fail" and "beam lost" in stop["reason"]
    run = catalog[stop["run_start"]]
    assert run.metadata["stop"]["exit_status"] == "fail"
    assert run.metadata["start"]["tool"] == "orbit_response"
    prim = read_stream(run)  # the partial data: the columns measured before the loss
    assert prim["orm-index"].tolist() == [0, 1]
    assert prim["orm-orbit_plus"].shape == (2, 448) and np.all(np.isfinite(prim["orm-orbit_plus"]))
    assert "results" not in list(run)


def test_machine_stubs(machine, RE):
    """The stubs the plans are built of (no run is opened by any of them)."""
    from acc_bluesky.plan_stubs import (
        check_limits,
        read_orbit,
        restore_setpoints,
        restoring,
        set_family,
        snapshot_setpoints,
        step_corrector,
    )
    from acc_bluesky.profile import LimitError

    twin = machine.twin
    before = twin.snapshot()
    docs = []
    RE.subscribe(lambda n, d: docs.append(n))
    out = {}

    def plan():
        out["snap"] = yield from snapshot_setpoints(machine)
        x, y = yield from read_orbit(machine, n_avg=3)
        out["orbit"] = (x, y)
        out["new"] = yield from step_corrector(machine, "HST_007", 0.25)
        yield from step_corrector(machine, ("VST", 2), -0.5)
        yield from set_family(machine.quad["QF2"], before["QF2"] * 1.001)
        out["moved"] = yield from restore_setpoints(machine, out["snap"])

    RE(plan())
    assert docs == []  # stubs never open a run
    assert same_snapshot(out["snap"], before) and same_snapshot(twin.snapshot(), before)
    assert out["new"] == 0.25 and set(out["moved"]) == {"HST", "VST", "QF2"}
    x, y = out["orbit"]
    tx, ty = twin.read_bpms()
    assert np.abs(x - tx).max() < 1e-6 and x.shape == (224,)  # averaged readings (noise 0.1 um)
    with pytest.raises(LimitError, match="HST.*outside the limits"):
        check_limits(machine.hcor, np.full(224, 9.0))
    check_limits(machine.rf, before["RF:frequency"] + 10.0)
    with pytest.raises(LimitError, match="QF2"):
        RE(set_family(machine.quad["QF2"], np.full(32, 1e4)))
    # restoring(): the wrapped plan's changes are undone, also on success unless on_success=False
    RE(restoring(machine, step_corrector(machine, "HST_001", 1.0)))
    assert same_snapshot(twin.snapshot(), before)
    RE(restoring(machine, step_corrector(machine, "HST_001", 1.0), on_success=False))
    assert twin.get_setpoint("HST", 0) == 1.0
    # a BPM out of service is not checked; a dead in-service one is named
    twin.anomalies.dead_bpm(4)
    with pytest.raises(BeamLostError, match="1 in-service BPM\\(s\\) read NaN.*BPM_005"):
        RE(read_orbit(machine))
    x, _ = RE(read_orbit(machine, ignore=[4])).plan_result
    assert np.isnan(x[4]) and np.isfinite(np.delete(x, 4)).all()
    # save_config moves nothing, even when interrupted
    now = twin.snapshot()
    with pytest.raises(RuntimeError, match="injected"):
        RE(Interrupt(machine, 1, RuntimeError("injected"))(save_config(machine)))
    assert same(twin.snapshot(), now)


def same_snapshot(a: dict, b: dict) -> bool:
    return same(a, b)
