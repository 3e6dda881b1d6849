"""save_config / restore_config / compare_config: every setpoint, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from acc_bluesky.analysis import config_from_run
from acc_bluesky.analysis.config import split_setpoints
from acc_bluesky.data import read_results, read_stream
from acc_bluesky.plans import compare_config, restore_config, save_config
from acc_bluesky.profile import LimitError


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_save_change_compare_restore(machine, RE, catalog):
    twin = machine.twin
    # bad configurations first: refused before anything moves
    saved = twin.snapshot()
    bad = dict(saved)
    bad["QXX"] = np.zeros(3)
    with pytest.raises(KeyError, match="family 'QXX' which this machine does not have"):
        RE(restore_config(machine, bad))
    bad = dict(saved)
    bad["HST"] = np.full(224, 9.0)
    with pytest.raises(LimitError, match="HST"):
        RE(restore_config(machine, bad))
    bad = dict(saved)
    bad["QF2"] = np.zeros(5)
    with pytest.raises(ValueError, match="QF2.*5 setpoints, the machine 32"):
        RE(restore_config(machine, bad))
    assert same(twin.snapshot(), saved)

    saved = twin.snapshot()
    uid = RE(save_config(machine, name="golden"))
    run = catalog[uid]
    assert run.metadata["start"]["tool"] == "config" and run.metadata["start"]["config_name"] == "golden"
    cfg = config_from_run(run)
    assert same(cfg, saved)  # every family and the RF, bit for bit
    res = read_results(run)
    x, y = twin.read_bpms()
    assert np.abs(res["orbit_x"] - x).max() < 1e-6 and res["orbit_y"].shape == (224,)
    # the primary event: every setpoint (concatenated, layout in the start document), the RF and the orbit
    prim = read_stream(run)
    start = run.metadata["start"]
    fams = split_setpoints(prim["config-setpoints"][0], start["config_families"], start["config_sizes"])
    np.testing.assert_array_equal(fams["QF2"], saved["QF2"])
    assert prim["config-rf_frequency"][0] == saved["RF:frequency"]
    assert prim["bpm-x"].shape == (1, 224)

    # change a few things
    twin.set_setpoint("HST", 0.37, 5)
    twin.set_setpoint("QF2", twin.get_setpoint("QF2", 3) * 1.001, 3)
    twin.set_rf_frequency(saved["RF:frequency"] + 12.5)
    diffs = compare_config(uid, machine)
    assert [d.device for d in diffs] == ["HST_006", "QF2_004", "RF:frequency"]
    assert diffs[0].a == 0.0 and diffs[0].b == 0.37 and diffs[0].units == "A"
    assert diffs[2].delta == pytest.approx(12.5) and diffs[2].units == "Hz"
    assert "HST_006" in str(diffs)

    uid2 = RE(restore_config(machine, uid))
    assert same(twin.snapshot(), saved)
    run2 = catalog[uid2]
    assert run2.metadata["start"]["tool"] == "config_restore" and run2.metadata["start"]["config_source"] == uid
    r2 = read_results(run2)
    assert int(r2["n_changed"]) == 3
    s2 = run2.metadata["start"]
    delta = split_setpoints(r2["delta_setpoints"], s2["config_families"], s2["config_sizes"])
    assert delta["HST"][5] == -0.37 and np.count_nonzero(delta["HST"]) == 1 and np.count_nonzero(delta["QF2"]) == 1
    assert float(r2["delta_rf_frequency"]) == pytest.approx(-12.5)
    before = split_setpoints(read_stream(run2, "before")["config-setpoints"][0], s2["config_families"],
                             s2["config_sizes"])
    assert before["HST"][5] == 0.37
    assert len(compare_config(uid, machine)) == 0
    # two runs compared: the saved one and a later save
    uid3 = RE(save_config(machine, name="same"))
    assert len(compare_config(catalog[uid], catalog[uid3])) == 0
