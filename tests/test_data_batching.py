"""A run's write groups fitted to its points: the last group is written with the last point."""

from __future__ import annotations

from acc_bluesky.data.recorder import DEFAULT_BATCH_SIZE, run_batch_size


def test_run_batch_size_divides_the_points():
    assert run_batch_size(448) == 112  # 4 groups: the last written at the 448th point
    assert run_batch_size(896) == 112
    assert run_batch_size(60) == 60  # up to a group: the whole stream at its last point
    for n in (449, 7919, None, "x", 0, -3):  # no divisor near 100, or no announced points: the default
        assert run_batch_size(n) == DEFAULT_BATCH_SIZE
    for n in range(101, 2000):
        b = run_batch_size(n)
        assert b == DEFAULT_BATCH_SIZE or (n % b == 0 and 50 <= b <= 200)
    assert run_batch_size(10, 1) == 1
