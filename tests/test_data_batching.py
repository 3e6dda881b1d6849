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


def test_log_lines_of_non_finite_arrays_read_back_exactly():
    """The write-ahead log's fast path (orjson with stand-ins for NaN/inf) gives the json module's line."""
    import json

    import numpy as np

    from acc_bluesky.data.backup import dumps_document
    from acc_bluesky.data.recorder import EventArray
    from acc_bluesky.data.wal import encode_document

    rng = np.random.default_rng(3)
    residual = rng.normal(size=(40, 30))
    residual[0, 0], residual[1, 1], residual[2, 2] = np.nan, np.inf, -np.inf
    cases = [residual, residual.view(EventArray), np.array([np.nan, -np.inf, np.inf, 0.1, -2e-300]),
             np.array([1.7976931348623155e308, np.nan]),  # a stand-in's own value: the slow path, same line
             np.array([-1.7976931348623151e308, np.inf]), np.array([1.5, np.nan], dtype=np.float32),
             np.arange(4), np.zeros(0)]
    for value in cases:
        doc = {"uid": "u", "time": 1.0, "descriptor": "d", "seq_num": 1, "filled": {},
               "data": {"v": value, "s": np.float64(2.5), "i": 3}, "timestamps": {"v": 1.0, "s": 1.0, "i": 1.0}}
        line = encode_document("event", doc)
        assert line.endswith(b"\n")
        back, ref = json.loads(line), json.loads(dumps_document("event", doc))
        assert json.dumps(back) == json.dumps(ref)  # NaN and Infinity tokens included
        np.testing.assert_array_equal(np.asarray(back["doc"]["data"]["v"], dtype=float), value.astype(float))
    for scalar in (float("nan"), np.float32("nan"), np.float64("inf")):  # NaN/Infinity, never null
        doc = {"uid": "u", "time": 1.0, "descriptor": "d", "seq_num": 1, "filled": {}, "data": {"s": scalar},
               "timestamps": {"s": 1.0}}
        back = json.loads(encode_document("event", doc))["doc"]["data"]["s"]
        assert back is not None and not np.isfinite(back)
    # a stand-in's text elsewhere in the event (a packed JSON string) beside a NaN array: the slow way, same line
    doc = {"uid": "u", "time": 1.0, "descriptor": "d", "seq_num": 1, "filled": {},
           "data": {"v": residual, "packed": '{"x": [1.7976931348623155e308, -1.7976931348623151e308]}'},
           "timestamps": {"v": 1.0, "packed": 1.0}}
    assert json.loads(encode_document("event", doc)) == json.loads(dumps_document("event", doc))
    assert json.loads(encode_document("event", doc))["doc"]["data"]["packed"] == doc["data"]["packed"]
