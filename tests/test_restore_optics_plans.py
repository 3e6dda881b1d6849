"""Every optics plan puts back exactly what it changed when interrupted at a random step: an exception, a pause
then ``RE.abort()``, a pause then ``RE.stop()``, or a beam loss. The twin's snapshot (every setpoint and the RF)
is compared with exact equality. Plan logic, on the small test ring (pyAT's HMBA cell): the same plans and steps as
on EBS at a fraction of the cost."""

from __future__ import annotations

from pathlib import Path

import pytest

from acc_bluesky.plan_stubs.machine import BeamLostError
from helpers import (  # noqa: F401 - fixtures
    Interrupt,
    draw_step,
    module_catalog,
    module_run_engine,
    run_documents,
    run_interrupted,
    same,
)
from acc_bluesky.plans import optics as po

HMBA = str(Path(__file__).parent / "profiles" / "hmba" / "profile.yaml")

# plan factory; the range of steps (``set`` messages and events, counted in the plan's order) where the
# interruption is drawn, chosen so that at least one move has completed before it; does the plan change anything?
PLANS = {
    "measure_tune": (lambda m: po.measure_tune(m, n_avg=4), (1, 4), False),
    "measure_tune_response": (lambda m: po.measure_tune_response(m, families=["QF1", "QD2"]), (3, 11), True),
    "correct_tune": (lambda m: po.correct_tune(m, _tune_target(m), response="model", figure_dir=False), (4, 5),
                     True),
    "measure_chromaticity": (lambda m: po.measure_chromaticity(m, steps=5, figure_dir=False), (2, 10), True),
    "measure_chromaticity_response": (
        lambda m: po.measure_chromaticity_response(m, families=["SF2"], bipolar=False, steps=3, order=1), (2, 16),
        True),
    "correct_chromaticity": (
        lambda m: po.correct_chromaticity(m, _chrom_target(m), steps=3, order=1, figure_dir=False), (2, 17), True),
}


def _tune_target(m):
    q = m.twin.tunes()
    return (round(float(q[0]) + 0.01, 4), round(float(q[1]) - 0.01, 4))


def _chrom_target(m):
    xi = m.twin.chromaticity()
    return (round(float(xi[0]) + 1.0, 2), round(float(xi[1]) + 1.0, 2))  # 1 away, within the sextupoles' limits


def _k(name: str, mode: str) -> int:
    return draw_step(name, mode, *PLANS[name][1])


def _stops(docs):
    return [d for n, d in docs if n == "stop"]


# One machine and one RunEngine for the module (fast); every test starts from the twin's reset state, which is
# the state of a fresh machine with the same seed (the errors are the machine: reset keeps them).
@pytest.fixture(scope="module")
def shared_machine():
    from acc_bluesky.machine import connect

    return connect(HMBA, mode="sim", seed=1)


@pytest.fixture
def machine(shared_machine):
    shared_machine.twin.reset()
    return shared_machine


@pytest.mark.parametrize("mode", ["exception", "abort", "stop"])
@pytest.mark.parametrize("name", list(PLANS))
def test_interrupted_plan_restores_every_setpoint(name, mode, machine, RE, docs):
    make, _, changes = PLANS[name]
    before = machine.twin.snapshot()
    k = _k(name, mode)
    hook = Interrupt(machine, k, RuntimeError("injected fault") if mode == "exception" else "pause")
    run_interrupted(RE, hook, make(machine), mode, lambda: _stops(docs))
    assert hook.fired, f"the plan ended before step {k}"
    assert hook.changed == changes  # the plan had moved something before the interruption: not a vacuous test
    assert same(machine.twin.snapshot(), before), f"{name}: not restored after {mode} at step {k}"


@pytest.mark.parametrize("name", ["measure_tune_response", "measure_chromaticity", "correct_chromaticity"])
def test_beam_loss_during_a_scan(name, machine, RE, catalog, docs):
    make, (lo, hi), _ = PLANS[name]
    before = machine.twin.snapshot()
    hook = Interrupt(machine, (lo + hi) // 2, machine.twin.anomalies.lose_beam)
    with pytest.raises(BeamLostError, match="beam lost .*tune monitor reads \\(nan, nan\\).*beam current is 0 A"):
        RE(hook(make(machine)))
    assert same(machine.twin.snapshot(), before)
    stop = _stops(docs)[-1]
    assert stop["exit_status"] == "fail" and "beam lost" in stop["reason"]
    run = catalog[stop["run_start"]]
    assert run.metadata["stop"]["exit_status"] == "fail"
    # the partial data are kept: the events taken before the loss
    names = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    n_events = sum(1 for n, d in docs if n == "event" and names[d["descriptor"]] == "primary")
    assert n_events >= 1
    assert stop["num_events"].get("primary", 0) == n_events
