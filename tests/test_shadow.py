"""The digital shadow: the model side against twins (no EPICS), then the shadow process following the twin IOC."""

from __future__ import annotations

import time

import numpy as np
import pytest
from ioc_fixtures import *  # noqa: F403
from ioc_fixtures import PORTS, IocProcess, caget, caput

from acc_bluesky.profile import load_profile
from acc_bluesky.ioc import shadow_pv_names
from acc_bluesky.ioc.shadow import Measurement, Shadow, ShadowConfig
from acc_bluesky.twin import Twin


def measure(machine: Twin) -> Measurement:
    """What the live machine's PVs would show."""
    from acc_bluesky.ioc import Observer

    o = Observer(machine).observe()
    return Measurement(x=o.x, y=o.y, tunes=o.tunes, current=o.current, setpoints=o.setpoints,
                       readbacks=o.readbacks, rf_frequency=o.rf_frequency, rf_voltage=o.rf_voltage)


@pytest.fixture(scope="module")
def machine_twin():
    return Twin("ebs", seed=1)


@pytest.fixture(scope="module")
def model_twin():
    return Twin("ebs", seed=1)


@pytest.fixture(scope="module")
def design_twin():
    return Twin("ebs", seed=None)


def test_config_is_validated():
    with pytest.raises(ValueError, match="orbit_threshold must be a finite number > 0"):
        ShadowConfig(orbit_threshold=0.0)
    with pytest.raises(ValueError, match="reference must be 'start' or 'zero'"):
        ShadowConfig(reference="yesterday")
    with pytest.raises(ValueError, match="hold must be a finite number >= 0"):
        ShadowConfig(hold=-1)


def test_shadow_with_the_machines_errors_sees_only_noise_and_a_dead_corrector(machine_twin, model_twin):
    mach, model = machine_twin, model_twin
    try:
        sh = Shadow(mach.profile, twin=model, config=ShadowConfig(hold=1.0, reference="zero"))
        mach.set_setpoint("HST", 1.0, 4)
        m = measure(mach)
        sh.follow(m)
        st = sh.evaluate(m, now=0.0)
        assert not st.anomaly and st.conditions == []
        assert st.rms_x < 3e-7 and st.rms_y < 3e-7  # same machine: residual = BPM noise (1e-7 rms)
        assert np.max(np.abs(st.resid_tunes)) < 6e-5
        mach.anomalies.dead("HST", 4)
        m = measure(mach)
        sh.follow(m)
        st = sh.evaluate(m, now=10.0)
        assert not st.anomaly and st.edge is None  # not yet: must last `hold`
        assert st.rms_x > 100e-6  # 50 urad lost
        st = sh.evaluate(m, now=11.1)
        assert st.anomaly and st.edge == "raised" and st.count == 1
        hst5 = mach.profile.families["HST"].device_names[4]
        assert "orbit residual x changed by" in st.reason and f"{hst5} (set 1, reads 0)" in st.reason
        mach.anomalies.dead("HST", 4, on=False)
        m = measure(mach)
        sh.follow(m)
        st = sh.evaluate(m, now=12.0)
        assert st.anomaly and st.conditions == [] and st.reason == ""  # clearing, after `hold`
        st = sh.evaluate(m, now=13.1)
        assert not st.anomaly and st.edge == "cleared"
    finally:
        mach.reset()
        model.reset()


def test_design_model_uses_the_start_reference(machine_twin, design_twin):
    mach = machine_twin
    try:
        sh = Shadow(mach.profile, twin=design_twin, config=ShadowConfig(hold=0.0))
        m = measure(mach)
        st = sh.evaluate(m, now=0.0)
        assert st.rms_x == 0.0 and not st.anomaly  # the reference is this residual
        assert np.std(st.resid_x) > 50e-6  # an errored machine against the design: large but steady
        # an orbit-correction-sized change: the model follows it; residual change far below 50 um
        mach.set_setpoint("VST", 0.2, 30)
        m = measure(mach)
        sh.follow(m)
        st = sh.evaluate(m, now=1.0)
        assert design_twin.get_setpoint("VST", 30) == 0.2
        assert st.rms_y < 20e-6 and not st.anomaly, st.reason
        mach.anomalies.dead_bpm(4)
        st = sh.evaluate(measure(mach), now=2.0)
        assert st.anomaly and "1 BPM(s) read nothing: BPM_005" in st.reason
        mach.anomalies.lose_beam()
        st = sh.evaluate(measure(mach), now=3.0)
        assert "no beam" in st.reason
        sh.rebaseline()
        mach.anomalies.clear()
        m = measure(mach)
        st = sh.evaluate(m, now=4.0)
        assert st.rms_x == 0.0 and not st.anomaly and st.edge == "cleared"
    finally:
        mach.reset()
        design_twin.reset()


def test_disconnected_live_pvs_raise_the_flag(machine_twin, model_twin):
    sh = Shadow(machine_twin.profile, twin=model_twin, config=ShadowConfig(hold=0.0, reference="zero"))
    m = measure(machine_twin)
    assert not sh.evaluate(m, now=0.0).anomaly
    m.disconnected = ["P:ORBIT:X", "P:ORBIT:Y"]
    st = sh.evaluate(m, now=1.0)
    assert st.anomaly and "live machine unreachable: 2 PV(s) disconnected (P:ORBIT:X, P:ORBIT:Y)" in st.reason
    m.disconnected = []
    assert sh.evaluate(m, now=2.0).edge == "cleared"


# ---------------------------------------------------------------------------------------------------------
# the shadow process following the twin IOC
@pytest.fixture(scope="module")
def shadow_proc(twin_ioc, session_catalog_dir):
    cat = session_catalog_dir  # (its server already up; the snapshots are the only digital_shadow runs in it)
    sprefix = twin_ioc.prefix + "SH:"
    twin_ioc.command("reset")
    proc = IocProcess(["shadow", "ebs", "--prefix", twin_ioc.prefix, "--shadow-prefix", sprefix, "--catalog-dir",
                       str(cat), "--snapshot-period", "0", "--hold", "0.3"], PORTS["shadow"], "shadow")
    proc.start()
    proc.catalog_dir = cat
    proc.spvs = shadow_pv_names(twin_ioc.profile, sprefix)
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, proc.log()[-3000:]


def wait_for(pv: str, value, timeout: float = 10.0) -> float:
    """Seconds until ``pv`` reads ``value`` (fails after ``timeout``)."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            last = caget(pv, timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except TimeoutError:  # not served yet (the shadow IOC still starting on a loaded machine): ask again
            continue
        if last == value:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{pv} is {last!r}, not {value!r}, after {timeout} s")


def test_shadow_flags_a_dead_corrector_and_a_trip_then_clears(twin_ioc, shadow_proc):
    s = shadow_proc.spvs
    wait_for(s["connected"], 1, 60)
    wait_for(s["anomaly"], 0)
    assert int(caget(s["updates"])) > 0
    model_x = np.asarray(caget(s["orbit:x_model"]))
    design = Twin("ebs", seed=None)
    assert np.allclose(model_x, design.orbit()[0], atol=1e-12)  # the design model
    # a deliberate change the design model follows only approximately: rebaseline
    hst5, qf2_1 = twin_ioc.device("HST", 4), twin_ioc.device("QF2", 0)
    caput(twin_ioc.sp("HST", 4), 1.0)
    time.sleep(1.0)
    caput(s["rebaseline"], 1)
    wait_for(s["anomaly"], 0)
    count0 = int(caget(s["anomaly_count"]))
    design.set_setpoint("HST", 1.0, 4)
    assert np.allclose(np.asarray(caget(s["orbit:x_model"])), design.orbit()[0], atol=1e-12)  # followed
    # the corrector dies on the machine side: the flag rises within a few seconds
    twin_ioc.command(f"dead {hst5}")
    dt = wait_for(s["anomaly"], 1, 10)
    reason = caget(s["anomaly_reason"], as_string=True)
    assert "orbit residual x changed by" in reason and hst5 in reason, reason
    assert caget(s["orbit:x_rms"]) > 100e-6
    twin_ioc.command(f"dead {hst5} off")
    wait_for(s["anomaly"], 0, 10)
    assert caget(s["orbit:x_rms"]) < 20e-6
    # a quadrupole family trips
    twin_ioc.command("trip QF2")
    wait_for(s["anomaly"], 1, 10)
    assert qf2_1 in caget(s["anomaly_reason"], as_string=True)
    twin_ioc.command("trip QF2 off")
    wait_for(s["anomaly"], 0, 10)
    assert int(caget(s["anomaly_count"])) == count0 + 2
    print(f"dead corrector flagged after {dt:.2f} s")
    twin_ioc.command("reset")


def test_shadow_snapshots_are_in_tiled(twin_ioc, shadow_proc):
    from acc_bluesky.data import find_runs, open_catalog, read_stream

    s = shadow_proc.spvs
    deadline = time.monotonic() + 30
    while int(caget(s["snapshots"])) < 4 and time.monotonic() < deadline:  # 2 rises + 2 falls
        time.sleep(0.2)
    assert int(caget(s["snapshots"])) >= 4
    cat = open_catalog(catalog_dir=shadow_proc.catalog_dir)
    runs = list(find_runs(cat, tool="digital_shadow").values())
    triggers = [r.metadata["start"]["trigger"] for r in runs]
    assert triggers.count("anomaly_raised") >= 2 and triggers.count("anomaly_cleared") >= 2
    raised = [r for r in runs if r.metadata["start"]["trigger"] == "anomaly_raised"][0]
    md = raised.metadata["start"]
    assert md["mode"] == "epics" and md["facility"] == "ESRF" and md["anomaly"] is True
    assert "orbit residual x" in md["anomaly_reason"]
    data = read_stream(raised)
    x = np.asarray(data["x_measured"]).reshape(-1, 224)[0]
    res = np.asarray(data["x_residual"]).reshape(-1, 224)[0]
    model = np.asarray(data["x_model"]).reshape(-1, 224)[0]
    assert np.allclose(res, x - model)
    n_magnets = sum(len(f) for f in load_profile("ebs").families.values())
    sp = np.asarray(data["setpoints"]).reshape(-1, n_magnets)[0]
    lo, hi = md["families"]["HST"]
    assert sp[lo + 4] == 1.0
    assert float(np.asarray(data["rms_x"]).reshape(-1)[0]) > 100e-6
