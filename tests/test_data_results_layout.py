"""The layout of a run's ``results`` stream: small arrays packed in one JSON data key (few Tiled nodes to write and
read), large ones their own keys, scalars columns of the event table; runs recorded the old way (one data key per
array) read the same, by ``read_results``, ``run_results`` and the analysis ``from_run`` readers."""

from __future__ import annotations

import json

import bluesky.preprocessors as bpp
import numpy as np
import pytest
from data_fixtures import (  # noqa: F401 - fixtures
    _isolated_data_env,
    fake_machine,
    machine,
    run_engine,
)

from acc_bluesky._packed import PACK_MAX_SIZE, PACKED_KEY, pack_arrays, unpack_arrays
from acc_bluesky.analysis import OrbitResponse
from acc_bluesky.analysis._common import run_results
from acc_bluesky.data import (
    read_dataset,
    read_results,
    read_stream,
    stream_data_keys,
    tool_metadata,
)
from acc_bluesky.plan_stubs.results import store_result


@pytest.fixture(scope="module")
def module_catalog_dir(session_catalog_dir):
    """The session's catalogue folder (its server already up: a server of the module's own costs a start); this
    module reads its runs back by uid or by its tests' ``test_token``."""
    return session_catalog_dir


RNG = np.random.default_rng(7)

RESULTS = {
    "big": RNG.normal(size=(PACK_MAX_SIZE + 1,)),  # its own key (a zarr array)
    "x_after": RNG.normal(scale=1e-4, size=24),
    "with_nan": np.array([1.5, np.nan, np.inf, -np.inf, 5e-324, 1.7976931348623157e308]),
    "matrix": RNG.normal(size=(3, 4)),
    "flags": np.array([1, 0, 1], dtype=np.int64),
    "ok": np.array([True, False]),
    "small_f32": np.array([0.1, 0.2], dtype=np.float32),
    "empty": np.zeros((0, 3)),
    "rms": 1.25e-5,
    "n_sv": 7,
    "converged": True,
    "method": "svd",
}
UNITS = {"big": "m/rad", "x_after": "m", "with_nan": "m", "rms": "m"}
DESCRIPTIONS = {"x_after": "horizontal orbit after the correction", "rms": "rms orbit"}


def _store_plan(mach, results, pack=True, tool="orbit_correction", iterations=1, md=None):
    @bpp.run_decorator(md=tool_metadata(tool, mach) | (md or {}))
    def inner():
        for _ in range(iterations):
            yield from store_result(results, units={k: u for k, u in UNITS.items() if k in results},
                                    descriptions={k: d for k, d in DESCRIPTIONS.items() if k in results},
                                    pack=pack)

    return (yield from inner())


def _same(back, expected):
    assert set(back) >= set(expected), sorted(set(expected) - set(back))
    for k, v in expected.items():
        got, want = np.asarray(back[k]), np.asarray(v)
        if want.dtype.kind in "OUS":
            assert str(got) == str(want), k
            continue
        assert got.shape == want.shape, (k, got.shape, want.shape)
        assert got.dtype.kind == want.dtype.kind, (k, got.dtype, want.dtype)
        assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f"), k  # bit for bit


def test_pack_round_trip_is_exact():
    arrays = {k: v for k, v in RESULTS.items() if np.ndim(v) >= 1 and k != "big"}
    back = unpack_arrays(pack_arrays(arrays))
    for k, v in arrays.items():
        assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.shape(v)
        assert np.array_equal(back[k], v, equal_nan=np.asarray(v).dtype.kind == "f")


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "old_layout"])
def test_results_read_back_in_either_layout(run_engine, machine, pack):  # noqa: F811
    # (an empty array cannot be written in the old layout: the TiledWriter keeps it in the SQL event table)
    results = RESULTS if pack else {k: v for k, v in RESULTS.items() if k != "empty"}
    run = run_engine.catalog[run_engine(_store_plan(machine, results, pack=pack))]
    node = run["results"].base
    parts = sorted(node)
    if pack:  # one table (scalars + the packed arrays) and the one large array: 2 nodes, not 9
        assert parts == ["big", "internal"], parts
        keys = run["results"].metadata["data_keys"]
        assert keys[PACKED_KEY]["dtype"] == "string"
        assert keys[PACKED_KEY]["packed"]["x_after"]["units"] == "m"
        assert json.loads(str(node["internal"].read()[PACKED_KEY].iloc[-1]))["x_after"]["shape"] == [24]
    else:
        assert PACKED_KEY not in parts and "x_after" in parts and "matrix" in parts
    for back in (read_results(run), run_results(run)):
        _same(back, results)
        assert PACKED_KEY not in back
    units = stream_data_keys(run, "results")
    assert units["x_after"]["units"] == "m" and units["x_after"]["description"].startswith("horizontal orbit")
    assert units["x_after"]["shape"] == [24] and units["rms"]["units"] == "m"
    assert units["big"]["units"] == "m/rad"
    ds = read_dataset(run, "results")
    assert ds["x_after"].attrs["units"] == "m" and ds["x_after"].shape == (1, 24)


def test_packed_results_over_several_events_stack(run_engine, machine):  # noqa: F811
    small = {"kick": RNG.normal(size=12), "rms": 2e-5}
    run = run_engine.catalog[run_engine(_store_plan(machine, small, iterations=3))]
    data = read_stream(run, "results")
    assert data["kick"].shape == (3, 12) and np.array_equal(data["kick"][-1], small["kick"])
    assert np.array_equal(read_results(run)["kick"], small["kick"])


def test_packed_key_name_is_reserved():
    with pytest.raises(ValueError, match="reserved"):
        list(store_result({PACKED_KEY: np.zeros(2)}))
    assert len(list(store_result({PACKED_KEY: np.zeros(2)}, pack=False))) == 3  # the old layout: any name


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "old_layout"])
def test_an_orm_recorded_in_either_layout_reads_back_with_from_run(run_engine, machine, pack):  # noqa: F811
    """OrbitResponse.from_run of an ORM recorded with one data key per array (catalogues written before the
    packing) and of one packed: the same matrices, flags and names."""
    n_bpm, n_cor = 6, 4
    resp = OrbitResponse(matrix=RNG.normal(size=(2 * n_bpm, n_cor)), matrix_hw=RNG.normal(size=(2 * n_bpm, n_cor)),
                         bpm_names=[f"BPM_{i + 1:03d}" for i in range(n_bpm)],
                         corrector_names=["HST_001", "HST_002", "VST_001", "VST_002"],
                         planes=["x", "x", "y", "y"], rf=RNG.normal(size=2 * n_bpm), df=20.0, kind="measured")
    resp.good = np.array([True, True, False, True])
    uid = run_engine(_store_plan(machine, resp.to_results(), pack=pack, tool="orbit_response",
                                 md=resp.start_metadata()))
    back = OrbitResponse.from_run(run_engine.catalog[uid])
    assert np.array_equal(back.matrix, resp.matrix) and np.array_equal(back.matrix_hw, resp.matrix_hw)
    assert np.array_equal(back.rf, resp.rf) and back.df == 20.0
    assert back.good.tolist() == [True, True, False, True]
    assert back.corrector_names == resp.corrector_names and back.planes == resp.planes
