"""The cheap paths of a measurement step: the direct magnet put of ``move`` and the x/y orbit read of
``read_orbit`` (same values, limits and failures as the devices' own paths)."""

from __future__ import annotations

import bluesky
import numpy as np
import pytest
from bluesky.utils import FailedStatus

from acc_bluesky.plan_stubs.machine import _DirectPut, _movable, move, read_orbit


@pytest.fixture
def plain_re():
    return bluesky.RunEngine(context_managers=[], call_returns_result=True)


def test_move_puts_a_magnet_directly_with_its_limits(machine, plain_re):
    dev = machine.families["HST"][2]
    assert not dev.ramp_rate and isinstance(_movable(dev), _DirectPut) and _movable(dev) is _movable(dev)
    assert _movable(machine.rf) is machine.rf
    sp0 = machine.twin.get_setpoint("HST", 2)
    plain_re(move(dev, sp0 + 0.01))
    assert machine.twin.get_setpoint("HST", 2) == pytest.approx(sp0 + 0.01, abs=1e-15)
    with pytest.raises(FailedStatus):  # refused at the wait, as Magnet.set refuses, and nothing moved
        plain_re(move(dev, dev.limits.high + 1.0))
    assert machine.twin.get_setpoint("HST", 2) == pytest.approx(sp0 + 0.01, abs=1e-15)


def test_read_orbit_reads_what_the_device_reads(machine, plain_re):
    machine.twin.noise_on = False
    try:
        x, y = plain_re(read_orbit(machine)).plan_result
        tx, ty = machine.twin.read_bpms()
        np.testing.assert_array_equal(x, tx)
        np.testing.assert_array_equal(y, ty)
    finally:
        machine.twin.noise_on = True
