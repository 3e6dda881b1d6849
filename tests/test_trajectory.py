"""First turns: the trajectory response against tracking, windowed SVD steps, threading a ring with no closed
orbit (the decision generator driven straight on the twin, no RunEngine), and steering a transfer line.

Logic on the small ring (six HMBA cells, ``tests/profiles/tbt_hmba``) and on a line from a generated profile; one
EBS case at the profile's full alignment table (``error_scale=1.0``: no closed orbit before threading).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import at
import numpy as np
import pytest

from acc_bluesky.analysis import CorrectionSystem, model_orm
from acc_bluesky.analysis._common import corrector_table
from acc_bluesky.analysis.correction import limit_step
from acc_bluesky.analysis.trajectory import (
    ThreadingRequest,
    ThreadingResult,
    TrajectoryReading,
    TrajectoryResponse,
    model_trajectory_response,
    reached,
    thread_first_turns,
    trajectory_step,
)
from acc_bluesky.profile import load_profile
from acc_bluesky.profile.generate import write_profile
from acc_bluesky.twin import Twin

HMBA = Path(__file__).parent / "profiles" / "tbt_hmba" / "profile.yaml"


@pytest.fixture(scope="module")
def hmba():
    return load_profile(HMBA)


@pytest.fixture(scope="module")
def resp2(hmba):
    return model_trajectory_response(hmba, turns=2)


class Driver:
    """The tiny loop a plan will be: apply a ThreadingRequest to the twin, inject, read, send the reading back."""

    def __init__(self, twin: Twin, n_avg: int = 1):
        self.twin = twin
        self.n_avg = n_avg
        self.table = corrector_table(twin.profile)
        self.by_family: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for j, (_, fam, i, _) in enumerate(self.table):
            cols, idx = self.by_family.setdefault(fam, ([], []))
            cols.append(j)
            idx.append(i)
        self.by_family = {f: (np.array(c), np.array(i)) for f, (c, i) in self.by_family.items()}
        self.requests: list[ThreadingRequest] = []

    def setpoints(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = len(self.table)
        sp, lo, hi = np.zeros(m), np.zeros(m), np.zeros(m)
        for fam, (c, i) in self.by_family.items():
            sp[c] = self.twin.get_setpoint(fam)[i]
            lim = self.twin.family(fam).spec.limits
            lo[c], hi[c] = lim.low, lim.high
        return sp, lo, hi

    def apply(self, req: ThreadingRequest) -> None:
        self.requests.append(req)
        if req.correctors is not None:
            for fam, (c, i) in self.by_family.items():
                self.twin.set_setpoint(fam, req.correctors[c], index=i)
        if req.injection is not None:
            self.twin.beam.set_injection(req.injection)

    def measure(self, turns: int = 2) -> TrajectoryReading:
        shots = [self.twin.beam.inject(turns=turns) for _ in range(self.n_avg)]
        return TrajectoryReading(np.mean([s.x for s in shots], axis=0), np.mean([s.y for s in shots], axis=0))

    def run(self, gen):
        req = next(gen)
        while True:
            self.apply(req)
            try:
                req = gen.send(self.measure())
            except StopIteration as stop:
                return stop.value


def _orbit_correction(twin: Twin, iterations: int = 5) -> None:
    orm = model_orm(twin.profile, rf=True)
    system = CorrectionSystem.build(orm, fit_rf=True)
    s = system.solver.used_singular_values()
    nsv = int(np.sum(s >= 1e-3 * s[0]))
    drv = Driver(twin)
    for _ in range(iterations):
        x, y = twin.read_bpms()
        dk, drf = system.step(np.concatenate([x, y]), n_sv=nsv)
        sp, lo, hi = drv.setpoints()
        step, _ = limit_step(dk, sp, lo, hi)
        drv.apply(ThreadingRequest(sp + step))
        twin.set_rf_frequency(twin.rf_frequency + drf)


# ------------------------------------------------------------------------------------------------------------
def test_model_response_matches_tracking(hmba, resp2):
    """Columns of the 2-turn model response (correctors and injection knobs) against the twin's tracking."""
    twin = Twin(hmba, seed=None)
    drv = Driver(twin)
    sp0, _, _ = drv.setpoints()
    for j in (0, 13, 35, 36, 50, 71):  # h and v correctors along the ring
        cols = []
        for sign in (1, -1):  # central differences: the sextupoles' even orders cancel
            sp = sp0.copy()
            sp[j] += sign * 0.05  # A: 2.5 urad
            drv.apply(ThreadingRequest(sp))
            cols.append(drv.measure().vector())
        drv.apply(ThreadingRequest(sp0))
        col = (cols[0] - cols[1]) / 0.1
        assert np.abs(col - resp2.matrix_hw[:, j]).max() < 1e-4 * np.abs(resp2.matrix_hw[:, j]).max(), j
    for k, d in enumerate((1e-6, 1e-7, 1e-6, 1e-7)):
        cols = []
        for sign in (1, -1):
            trim = np.zeros(4)
            trim[k] = sign * d
            twin.beam.set_injection(trim)
            cols.append(drv.measure().vector())
        col = (cols[0] - cols[1]) / (2 * d)
        assert np.abs(col - resp2.injection[:, k]).max() < 1e-4 * np.abs(resp2.injection[:, k]).max(), k
    twin.beam.set_injection(np.zeros(4))
    one = model_trajectory_response(hmba, turns=1)
    assert np.array_equal(one.matrix, resp2.truncated(1).matrix)
    cal = resp2.matrix_hw[:, 0] / resp2.matrix[:, 0]
    assert np.nanmax(np.abs(cal[np.isfinite(cal)] - 5e-5)) < 1e-12  # rad/A of the profile


def test_correction_step_uses_the_bpms_reached_and_the_correctors_upstream(hmba, resp2):
    twin = Twin(hmba, seed=0, error_scale=1.0)
    acq = twin.beam.inject(turns=2)
    r = TrajectoryReading.of(acq)
    k = reached(r)
    assert k == acq.bpms_reached and 0 < k < 60
    step = trajectory_step(resp2, r.vector(1), n_passages=k, turns=1, injection=True)
    last_bpm = hmba.bpm_refpts[k - 1]
    assert np.all(resp2.corrector_refpts[step.var_mask] < last_bpm)
    assert np.count_nonzero(step.dk) == np.count_nonzero(step.var_mask)
    assert step.obs_mask.sum() == 2 * k and step.predicted_rms < np.sqrt(np.nanmean(r.vector(1) ** 2))
    with pytest.raises(ValueError, match="response rows"):
        trajectory_step(resp2, r.vector(2)[:10])


def test_reached_counts_past_a_dead_bpm():
    x = np.full((2, 10), np.nan)
    x[0, :7] = 1e-4
    x[0, 3] = np.nan  # dead, the beam went on
    assert reached((x, x)) == 7
    assert reached((np.full((1, 4), np.nan),) * 2) == 0
    bad = np.zeros(10, dtype=bool)
    bad[6] = True
    assert reached((x, x), bad=bad) == 6


def test_threading_a_ring_with_no_closed_orbit(hmba, resp2):
    # seed 0: no closed orbit at the start. (Seed 2 threads two turns too, but the closed orbit it then has passes
    # the offset sextupoles so far off-centre that their feed-down puts the one-turn map on a resonance, |eigenvalue|
    # 1.79: two turns survive, a stored beam would not; seed 4 threads two turns around a trajectory that has no
    # closed orbit nearby. Two turns are necessary for a closed orbit, not sufficient.)
    twin = Twin(hmba, seed=0, error_scale=1.0)
    assert twin.observables().lost  # no closed orbit with the full alignment table
    assert twin.beam.inject(turns=2).bpms_reached < 60  # lost in the first turn
    drv = Driver(twin)
    sp, lo, hi = drv.setpoints()
    res = drv.run(thread_first_turns(resp2, sp, lo, hi))
    assert res.success, res.message
    assert res.reached[-1] == 120  # two full turns
    assert twin.beam.inject(turns=2).bpms_reached == 120
    assert not twin.observables().lost  # the closed orbit exists: correct_orbit takes over
    now, _, _ = drv.setpoints()
    assert np.array_equal(now, res.setpoints) and np.all((now >= lo) & (now <= hi))
    assert {r.stage for r in drv.requests} >= {"first_turn", "balance"}
    back = ThreadingResult.from_run({"start": {"tool": "first_turns"}, **res.to_results()})
    assert back.success and back.reached == res.reached and np.array_equal(back.setpoints, res.setpoints)
    assert set(ThreadingResult.result_units()) == set(res.to_results())


def test_wiggle_when_the_beam_is_stuck(resp2):
    """A fake machine: the beam stops at BPM 7 until a corrector upstream moves by more than 2 A."""
    n, m = resp2.nbpm, resp2.ncor
    sp0 = np.zeros(m)
    lo, hi = np.full(m, -8.0), np.full(m, 8.0)
    upstream = np.nonzero(resp2.corrector_refpts < resp2.bpm_refpts[6])[0]

    def machine(req_sp):
        k = 2 * n if np.abs(req_sp[upstream] - sp0[upstream]).max() > 2.0 else 7
        x = np.full((2, n), np.nan)
        x.reshape(-1)[:k] = 0.0  # on axis where the beam is: nothing for the SVD to correct
        return TrajectoryReading(x, x.copy())

    gen = thread_first_turns(resp2, sp0, lo, hi, injection=None, stall=3)
    req, stages, state = next(gen), [], sp0.copy()
    while True:
        stages.append(req.stage)
        if req.correctors is not None:
            state = req.correctors
        try:
            req = gen.send(machine(state))
        except StopIteration as stop:
            res = stop.value
            break
    assert res.success and stages.count("first_turn") == 4 and "wiggle" in stages
    assert np.abs(res.setpoints[upstream]).max() > 2.0 and res.injection.tolist() == [0, 0, 0, 0]


def test_threading_refuses_bad_input(hmba, resp2):
    with pytest.raises(ValueError, match="turns=3"):
        next(thread_first_turns(resp2, np.zeros(resp2.ncor), -8, 8, turns=3))
    gen = thread_first_turns(resp2, np.zeros(resp2.ncor), -8, 8)
    next(gen)
    with pytest.raises(ValueError, match="readings of 2 turns"):
        gen.send((np.zeros((1, 60)), np.zeros((1, 60))))
    none = np.full((2, 60), np.nan)
    gen = thread_first_turns(resp2, np.zeros(resp2.ncor), -8, 8)
    next(gen)
    with pytest.raises(StopIteration) as stop:
        gen.send((none, none))
    assert not stop.value.value.success and "no BPM sees the beam" in stop.value.value.message


def test_response_round_trip(resp2, tmp_path):
    run = {"start": {"uid": "abcdef0123", "tool": "trajectory_response", **resp2.start_metadata()},
           **resp2.to_results()}
    back = TrajectoryResponse.from_run(run)
    assert back.turns == 2 and back.corrector_names == resp2.corrector_names and back.uid == "abcdef0123"
    assert np.array_equal(back.matrix_hw, resp2.matrix_hw) and np.array_equal(back.injection, resp2.injection)
    assert np.array_equal(back.corrector_refpts, resp2.corrector_refpts)
    with pytest.raises(ValueError, match="not a 'trajectory_response' run"):
        TrajectoryResponse.from_run({"start": {"tool": "tbt"}, **resp2.to_results()})
    assert resp2.plot(tmp_path / "trm.png").stat().st_size > 10_000


def test_transfer_line_steered_to_its_bpm_offset_floor(tmp_path):
    """A generated line profile: the same response (one pass) and steps, averaged shots (jitter)."""
    cells = []
    for i in range(8):
        cells += [at.Quadrupole(f"QF{i % 2}", 0.3, 1.2), at.Monitor("BPM"), at.Corrector(f"HCOR{i}", 0.1, [0, 0]),
                  at.Drift("D", 1.5), at.Quadrupole(f"QD{i % 2}", 0.3, -1.2), at.Monitor("BPM"),
                  at.Corrector(f"VCOR{i}", 0.1, [0, 0]), at.Drift("D", 1.5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at.Lattice(cells, name="tline", energy=3e9, periodicity=1).save(str(tmp_path / "tline.m"))
    prof = load_profile(write_profile(tmp_path / "tline.m", tmp_path / "tl"))
    assert prof.kind == "line"
    resp = model_trajectory_response(prof)
    with pytest.raises(ValueError, match="transfer line"):
        model_trajectory_response(prof, turns=2)
    twin = Twin(prof, seed=3)
    drv = Driver(twin, n_avg=8)
    before = twin.beam.inject(jitter=False)
    for _ in range(4):
        r = drv.measure(turns=1)
        st = trajectory_step(resp, r.vector(), n_passages=reached(r), injection=True)
        sp, lo, hi = drv.setpoints()
        step, _ = limit_step(st.dk, sp, lo, hi)
        drv.apply(ThreadingRequest(sp + step, twin.beam.injection_trim + st.dinj))
    after = twin.beam.inject(jitter=False)
    floor = np.sqrt(np.mean(twin.errors.bpm_offset**2, axis=0))
    rms_after = np.array([np.sqrt(np.mean(after.x_true**2)), np.sqrt(np.mean(after.y_true**2))])
    rms_before = np.array([np.sqrt(np.mean(before.x_true**2)), np.sqrt(np.mean(before.y_true**2))])
    assert np.all(rms_after <= 1.5 * floor), (rms_after, floor)
    assert np.all(rms_after < rms_before / 5)


def test_threading_ebs_at_full_errors_then_the_orbit_is_corrected():
    twin = Twin("ebs", seed=1, error_scale=1.0)
    assert twin.observables().lost  # no closed orbit before threading (the verdict is renewed as the orbit moves)
    resp = model_trajectory_response(twin.profile, turns=2)
    drv = Driver(twin)
    sp, lo, hi = drv.setpoints()
    res = drv.run(thread_first_turns(resp, sp, lo, hi))
    assert res.success and res.reached[-1] == 2 * 224, res.message
    assert not twin.observables().lost
    _orbit_correction(twin, iterations=3)
    x, y = twin.orbit()
    assert np.sqrt(np.mean(x**2)) < 100e-6 and np.sqrt(np.mean(y**2)) < 100e-6
