"""Bad input is refused before anything moves, with a message that says what is wrong and what to do (issue:
control-room hardening, tool parameters and physics guards). On the small ring of ``tests/profiles/hmba``."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

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
def RE(session_catalog_dir):  # noqa: N802
    from acc_bluesky.data import make_run_engine

    return make_run_engine(catalog_dir=session_catalog_dir, progress=False)


def unmoved(m, before):
    after = m.twin.snapshot()
    return all(np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before)


def refused(RE, m, plan, exc, match):  # noqa: N803
    import time

    before = m.twin.snapshot()
    t0 = time.time()
    with pytest.raises(exc, match=match):
        RE(plan)
    assert unmoved(m, before), "a refused plan moved something"
    if RE.catalog is not None:  # no run started during the refused call (a search of the start times: the session's
        # catalogue holds every run of this worker, one request each would cost seconds)
        from acc_bluesky.data import find_runs

        RE.wait_for_catalog()
        started = list(find_runs(RE.catalog, since=t0))
        assert started == [], "a refused plan recorded a run"


@pytest.mark.parametrize("target", [(0.5, 0.5), (0.05, 0.95), (0.333, 0.2), (0.25, 0.75)])
def test_tune_targets_on_a_resonance_are_refused(m, RE, target):  # noqa: N803
    from acc_bluesky.plans import correct_tune

    refused(RE, m, correct_tune(m, target=target, response="model"), ValueError,
            r"is 0\.0\d+ from the resonance .* \(order [123]\).* Nothing was moved")


def test_wrong_family_kind_and_unknown_family(m, RE):  # noqa: N803
    from acc_bluesky.plans import correct_tune, measure_chromaticity_response

    refused(RE, m, correct_tune(m, target=(0.44, 0.39), families=["HST", "VST"], response="model"), ValueError,
            r"family 'HST' is a hcor family, not a quadrupole family: this tool moves quadrupoles")
    refused(RE, m, measure_chromaticity_response(m, families=["QF4"]), ValueError, "not a sextupole family")
    refused(RE, m, correct_tune(m, target=(0.44, 0.39), families=["QXX", "QF4"], response="model"), KeyError,
            r"unknown family 'QXX'; quadrupole families")


@pytest.mark.parametrize("kwargs, match", [
    ({"n_avg": 2.7}, r"n_avg must be an integer, got 2\.7 \(float\) \(no silent truncation"),
    ({"n_avg": 0}, r"n_avg \(readings averaged per point\) must be >= 1 and <= 100"),
    ({"n_avg": 10 ** 8}, r"<= 100 \(profile tools.limits.max_average\)"),
    ({"n_avg": True}, r"n_avg must be an integer, got True"),
    ({"settle": math.nan}, r"settle must be a finite number, got nan"),
    ({"delta": math.inf}, r"delta must be a finite number, got inf"),
    ({"bipolar": "yes"}, r"bipolar must be a bool \(True or False\), got 'yes'"),
])
def test_measure_orm_parameters_are_checked_at_the_call(m, RE, kwargs, match):  # noqa: N803
    from acc_bluesky.plans import measure_orm

    refused(RE, m, measure_orm(m, correctors=m.hcor.names[:2], **kwargs), ValueError, match)


@pytest.mark.parametrize("kwargs, match", [
    ({"tikhonov": math.nan}, r"tikhonov must be a finite number, got nan"),
    ({"target": math.nan}, r"target must be \(x, y\) arrays"),
    ({"target": (np.full(10, np.nan), np.zeros(10))}, r"target orbit has non-finite values"),
    ({"gain": 1.5}, r"gain \(fraction of the correction applied\) must be > 0 and <= 1"),
    ({"max_iter": 3.0}, r"max_iter must be an integer"),
    ({"n_sv": 99}, r"n_sv must be between 1 and \d+ \(the number of singular values"),
])
def test_correct_orbit_parameters(m, RE, kwargs, match):  # noqa: N803
    from acc_bluesky.plans import correct_orbit

    refused(RE, m, correct_orbit(m, orm="model", **kwargs), (ValueError, TypeError), match)


def test_a_run_of_the_wrong_tool_is_refused(m, RE):  # noqa: N803
    from acc_bluesky.plan_stubs.runs import WrongRun
    from acc_bluesky.plans import correct_orbit, correct_tune, save_config

    cfg = RE(save_config(m, name="x"))
    refused(RE, m, correct_orbit(m, orm=cfg), WrongRun, r"is a 'config' run.*orm must be a run of 'orbit_response'")
    refused(RE, m, correct_tune(m, target=(0.44, 0.39), response=cfg), WrongRun,
            r"response must be a run of 'tune_response'")


@pytest.mark.parametrize("ref", ["deadbeef", "0123456789abcdef0123456789abcdef0123"])
def test_an_unknown_run_uid_is_named_with_where_it_was_looked_for(m, RE, ref):  # noqa: N803
    """A partial uid the catalogue does not hold (its server has no regular-expression search: the lookup falls
    back to "not found", not to Tiled's HTTP 400), and a whole one: RunNotFound naming the uid and the catalogue."""
    from acc_bluesky.plan_stubs.runs import RunNotFound
    from acc_bluesky.plans import correct_orbit, correct_tune, restore_config

    for plan in (correct_orbit(m, orm=ref), restore_config(m, ref), correct_tune(m, (0.44, 0.39), response=ref)):
        refused(RE, m, plan, RunNotFound, rf"uid '{ref}' in this session or .*catalogue")


def test_a_bump_past_the_corrector_limits_names_its_bpm(m, RE):  # noqa: N803
    from acc_bluesky.plans import orbit_bump
    from acc_bluesky.profile import LimitError

    refused(RE, m, orbit_bump(m, "BPM_005", 0.05, plane="x"), LimitError,
            r"x bump of 50 mm at BPM_005 \(BPM index 4\) does not fit in the corrector limits.*Nothing was changed")


def test_no_beam_no_motion(m, RE):  # noqa: N803
    from acc_bluesky.plan_stubs.machine import BeamLostError
    from acc_bluesky.plans import correct_orbit, measure_chromaticity, measure_dispersion, measure_orm

    m.twin.anomalies.lose_beam()
    for plan in (measure_orm(m, correctors=m.hcor.names[:1]), measure_dispersion(m), correct_orbit(m, orm="model"),
                 measure_chromaticity(m, figure_dir=False)):
        refused(RE, m, plan, BeamLostError, r"did not start: no beam .* Nothing was moved and no run was recorded")


def test_a_stuck_corrector_is_flagged_and_left_out_of_the_correction(m, RE, catalog_for):  # noqa: N803
    from acc_bluesky.analysis import OrbitResponse
    from acc_bluesky.plans import correct_orbit, measure_orm

    m.twin.anomalies.stuck("HST", 2)
    with pytest.warns(UserWarning, match=rf"measure_orm: 1 corrector\(s\) .*{m.hcor.names[2]}.*Stuck or dead"):
        uid = RE(measure_orm(m, correctors=m.hcor.names + m.vcor.names))
    resp = OrbitResponse.from_run(catalog_for(RE)[uid])
    assert resp.good is not None and list(np.nonzero(~resp.good)[0]) == [2]
    sp_before = m.twin.get_setpoint("HST", 2)
    with pytest.warns(UserWarning, match="leaving out 1 corrector"):
        RE(correct_orbit(m, orm=uid, max_iter=1, figure_dir=False))
    assert m.twin.get_setpoint("HST", 2) == sp_before  # never moved


@pytest.fixture
def catalog_for():
    def get(RE):  # noqa: N803
        return RE.catalog

    return get


def test_ring_only_tools_name_themselves_on_a_line():
    from acc_bluesky.plan_stubs.tool import ToolError, tool

    @tool("demo", ring_only="it needs a closed orbit")
    def demo(machine, md=None):
        yield from []

    class Line:  # what the scaffold looks at
        class profile:  # noqa: N801
            kind = "line"
            name = "bts"

            @staticmethod
            def tool_defaults(name):
                return {}

        bpm = None

    with pytest.raises(ToolError, match=r"demo is not available for a transfer line \(profile 'bts' is kind: line\): "
                                        r"it needs a closed orbit"):
        list(demo(Line()))


def test_parameter_bounds_come_from_the_profile(m):
    from acc_bluesky.plan_stubs.checks import ParameterError, bound_of, check_parameters

    assert bound_of("n_avg", m.profile) == (1, 100, False)
    with pytest.raises(ParameterError, match="must be >= 1 and <= 100"):
        check_parameters("x", {"n_avg": int}, {"n_avg": 101}, m.profile)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_parameters("x", {"n_avg": int, "tol": float}, {"n_avg": 100, "tol": 1e-3}, m.profile)
