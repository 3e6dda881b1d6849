"""The twin IOC as a control room's clients see it, against a real IOC process on loopback started as an operator
would (no fault injection; autosave, a PV list and PV Access on):

- a refused put (beyond the limits, not a number, a waveform of the wrong length) fails at the client: the CA
  put-callback status (pyepics' libca, aioca as used by ophyd-async, caproto) is ECA_PUTFAIL, a PVA put (p4p)
  raises; the record keeps its value and shows a MINOR alarm until the next good put; a put of the limit passes;
- the PV list has exactly the IOC's records, each with the record type and DESC the IOC serves;
- the fault-injection PVs do not exist; heartbeat and uptime advance;
- the setpoints survive a restart (autosave), exactly; a bad autosave file stops the IOC before it serves.

(pyepics' ``caput(wait=True)`` itself returns 1 whatever the server answered: pyepics 3.5 drops the put-callback
status; the status reaches its libca callback, which is what is checked here.)
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from ioc_fixtures import *  # noqa: F403
from ioc_fixtures import (
    PORTS,
    PREFIX,
    IocProcess,
    TwinIocHandle,
    caget,
    caput,
    free_port,
)

from acc_bluesky.ioc import FAULT_KEYS
from acc_bluesky.ioc.autosave import read_pv_list
from acc_bluesky.twin import Twin

TOL = 7e-7  # 7 sigma of the 1e-7 m BPM noise
PUTFAIL = "Channel write request failed"  # libca's message for ECA_PUTFAIL


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    """One IOC for the module, as ``acc-bluesky ioc ebs --pva --autosave F --pv-list L`` (faults off)."""
    d = tmp_path_factory.mktemp("clients_ioc")
    prefix, pva = "C" + PREFIX, free_port()
    args = ["serve", "ebs", "--seed", "1", "--prefix", prefix, "--pva", "--pva-port", str(pva),
            "--autosave", str(d / "setpoints.json"), "--autosave-period", "0.2", "--pv-list", str(d / "pvs.csv")]
    h = TwinIocHandle(IocProcess(args, PORTS["clients"], "clients_ioc").start(), prefix, 1)
    h.args, h.dir, h.pva = args, d, pva
    yield h
    h.proc.stop()


@pytest.fixture(scope="module")
def pva(ioc):
    from p4p.client.thread import Context

    ctx = Context("pva", conf={"EPICS_PVA_ADDR_LIST": f"127.0.0.1:{ioc.pva + 1}", "EPICS_PVA_AUTO_ADDR_LIST": "NO",
                               "EPICS_PVA_BROADCAST_PORT": str(ioc.pva + 1)}, useenv=False)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def caproto_ctx():
    from caproto.threading.client import Context

    ctx = Context()
    yield ctx
    ctx.disconnect(wait=False)  # its threads stop on their own; waiting costs seconds on a busy host


def libca_put(pv: str, value, timeout: float = 10.0) -> str:
    """A CA put-callback through pyepics' libca; returns libca's message for the status the server sent."""
    from epics import ca, dbr

    chid = ca.create_channel(pv, connect=True)
    assert ca.connect_channel(chid, timeout=timeout), pv
    ftype = ca.field_type(chid)
    data = (dbr.Map[ftype] * 1)(value)
    got: list[int] = []
    cb = dbr.make_callback(lambda args: got.append(int(args.status)), dbr.event_handler_args)
    ca.PySEVCHK("put", ca.libca.ca_array_put_callback(ftype, 1, chid, data, cb, None))
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        ca.poll(evt=1e-3)
    assert got, f"no put-callback from {pv}"
    return ca.message(got[0])


def alarm(pv: str) -> tuple[str, str]:
    return caget(pv + ".SEVR", as_string=True), caget(pv + ".STAT", as_string=True)


async def test_refused_puts_fail_at_every_client_and_leave_an_alarm_until_the_next_good_put(ioc, pva, caproto_ctx):
    import aioca

    sp, rb = ioc.sp("HST", 2), ioc.rb("HST", 2)
    caput(sp, 1.0)
    assert alarm(sp) == ("NO_ALARM", "NO_ALARM")
    # CA put-callbacks: pyepics' libca, aioca (ophyd-async's CA layer), caproto
    assert libca_put(sp, 9.0) == PUTFAIL
    assert caget(sp) == 1.0 and alarm(sp) == ("MINOR", "HWLIMIT")
    assert libca_put(sp, 1.0) == "Normal successful completion"  # the value shown: a good put clears the alarm
    assert alarm(sp) == ("NO_ALARM", "NO_ALARM")
    try:
        with pytest.raises(aioca.CANothing, match="write request failed"):
            await aioca.caput(sp, -8.5, wait=True, timeout=10)
        assert caget(sp) == 1.0 and alarm(sp) == ("MINOR", "HWLIMIT")
        await aioca.caput(sp, 8.0, wait=True, timeout=10)  # the limit itself
    finally:
        aioca.purge_channel_caches()  # its channels belong to this test's event loop
    assert caget(rb) == 8.0 and alarm(sp) == ("NO_ALARM", "NO_ALARM")
    pv, = caproto_ctx.get_pvs(sp, timeout=10)
    resp = pv.write([float("nan")], wait=True, timeout=10)
    assert resp.status.name == "ECA_PUTFAIL"
    assert caget(sp) == 8.0 and alarm(sp) == ("MINOR", "WRITE")  # not a number: WRITE, not UDF INVALID
    assert pv.write([-8.0], wait=True, timeout=10).status.name == "ECA_NORMAL"
    assert caget(rb) == -8.0
    # PV Access, with and without waiting for completion
    for value, wait, stat in ((8.5, True, "HWLIMIT"), (float("nan"), True, "WRITE"), (-9.0, None, "HWLIMIT")):
        with pytest.raises(Exception) as info:
            pva.put(sp, value, wait=wait, timeout=10)
        assert type(info.value).__name__ == "RemoteError", info.value
        assert caget(sp) == -8.0 and alarm(sp) == ("MINOR", stat), (value, wait)
        got = pva.get(sp, timeout=10)
        assert got.severity == 1 and got == -8.0
    pva.put(sp, 0.0, wait=True, timeout=10)
    assert caget(rb) == 0.0 and alarm(sp) == ("NO_ALARM", "NO_ALARM")
    # a family waveform of the wrong length, or with one value out of range
    fam = ioc.pvs["HST:setpoints"]
    with pytest.raises(Exception, match="dbNotify"):
        pva.put(fam, np.zeros(5), wait=True, timeout=10)
    bad = np.zeros(224)
    bad[100] = 20.0
    assert caproto_ctx.get_pvs(fam, timeout=10)[0].write(bad, wait=True, timeout=10).status.name == "ECA_PUTFAIL"
    assert alarm(fam)[0] == "MINOR" and np.all(np.asarray(caget(ioc.pvs["HST:readbacks"])) == 0.0)
    # RF beyond its limits
    f0 = caget(ioc.pvs["rf:frequency"])
    assert libca_put(ioc.pvs["rf:frequency"], f0 + 1e6) == PUTFAIL
    assert caget(ioc.pvs["rf:frequency"]) == f0 and alarm(ioc.pvs["rf:frequency"]) == ("MINOR", "HWLIMIT")
    caput(ioc.pvs["rf:frequency"], f0)
    assert alarm(ioc.pvs["rf:frequency"]) == ("NO_ALARM", "NO_ALARM")


def test_pv_list_is_complete_with_record_types_units_and_desc(ioc):
    import epics

    rows = read_pv_list(ioc.dir / "pvs.csv")
    n = int(ioc.proc.ready_line.split("records=")[1].split()[0])
    assert len(rows) == n  # the IOC's own count of its records (pythonSoftIOC's record builder)
    names = [r.pv for r in rows]
    assert len(set(names)) == n
    assert set(ioc.pvs.values()) | set(ioc.opvs.values()) <= set(names)
    served = {k: v for k, v in ioc.tpvs.items() if k not in FAULT_KEYS}
    assert set(served.values()) <= set(names)
    rtype = epics.caget_many([f"{pv}.RTYP" for pv in names], as_string=True, timeout=30)
    assert [r.record_type for r in rows] == rtype
    desc = epics.caget_many([f"{pv}.DESC" for pv in names], as_string=True, timeout=30)
    assert [r.description for r in rows] == desc and all(desc)
    with_units = [r for r in rows if r.units]
    assert [r.units for r in with_units] == epics.caget_many([f"{r.pv}.EGU" for r in with_units], as_string=True,
                                                             timeout=30)
    kinds = {r.kind for r in rows}
    assert kinds == {"setpoint", "readback", "status", "internal"}  # no "command": faults are off
    assert all(r.kind == "internal" for r in rows if r.record_type == "fanout")


def test_fault_pvs_exist_only_with_allow_faults(ioc):
    import epics

    assert "faults=off" in ioc.proc.ready_line
    rows = {r.pv for r in read_pv_list(ioc.dir / "pvs.csv")}
    for key in FAULT_KEYS:
        assert ioc.tpvs[key] not in rows
    cmd = epics.PV(ioc.tpvs["cmd"])
    try:
        assert not cmd.wait_for_connection(0.5)
    finally:
        cmd.disconnect()


def test_heartbeat_and_uptime_advance(ioc):
    b0, u0 = int(caget(ioc.tpvs["heartbeat"])), caget(ioc.tpvs["uptime"])
    deadline = time.monotonic() + 5
    while (int(caget(ioc.tpvs["heartbeat"])) == b0 or caget(ioc.tpvs["uptime"]) <= u0) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a 1 Hz record, each of the two updated in turn
    assert int(caget(ioc.tpvs["heartbeat"])) > b0 and caget(ioc.tpvs["uptime"]) > u0 > 0
    assert caget(ioc.tpvs["uptime"] + ".EGU") == "s"


def test_setpoints_survive_a_restart_exactly_through_autosave(ioc, pva):
    p, path = ioc.pvs, ioc.dir / "setpoints.json"
    qf2 = np.asarray(caget(p["QF2:setpoints"])) * (1 + 2e-5 * np.arange(len(ioc.profile.families["QF2"])))
    caput(ioc.sp("HST", 7), 1.2345678901234567)
    caput(p["QF2:setpoints"], qf2)
    f = caget(p["rf:frequency"]) + 37.5
    caput(p["rf:frequency"], f)
    # written while the IOC runs (every --autosave-period while setpoints change), atomically
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        saved = json.loads(path.read_text())
        if saved["rf"]["frequency"] == f:
            break
        time.sleep(0.05)
    assert saved["families"]["HST"]["setpoints"][7] == 1.2345678901234567
    assert saved["families"]["QF2"]["setpoints"] == qf2.tolist()
    assert saved["families"]["HST"]["devices"] == ioc.profile.families["HST"].device_names
    # SIGTERM: a clean stop (exit 0), the last state saved, no temporary file left
    assert ioc.proc.stop() == 0 and "IOC stopped" in ioc.proc.log()
    assert [q.name for q in ioc.dir.iterdir() if q.name.startswith(".")] == []
    ioc.proc = IocProcess(ioc.args, PORTS["clients"], "clients_ioc_again").start()
    n = sum(len(f) for f in ioc.profile.families.values()) + 2
    assert f"autosave=restored {n} setpoints" in ioc.proc.ready_line and "pva=on" in ioc.proc.ready_line
    # read through PVA first (pyepics' cached channels of the old server may wait for its beacon anomaly to
    # reconnect, seconds to minutes on loopback); Channel Access on a channel this client never opened
    assert float(pva.get(ioc.sp("HST", 7), timeout=30)) == 1.2345678901234567  # (p4p: a fresh search)
    assert caget(ioc.rb("HST", 7), timeout=30) == 1.2345678901234567  # CA on a channel new to this client
    assert np.array_equal(np.asarray(pva.get(p["QF2:setpoints"], timeout=30)), qf2)
    assert np.array_equal(np.asarray(pva.get(p["QF2:readbacks"], timeout=30)), qf2)
    assert pva.get(p["rf:frequency"], timeout=30) == f
    t = Twin("ebs", seed=1)  # the machine behind the PVs is the restored one
    t.set_setpoint("HST", 1.2345678901234567, 7)
    t.set_setpoint("QF2", qf2)
    t.set_rf_frequency(f)
    xe, ye = t.errors.bpm_transform(*t.orbit())
    assert np.max(np.abs(np.asarray(caget(p["orbit:x"])) - xe)) < TOL
    assert np.max(np.abs(np.asarray(caget(p["orbit:y"])) - ye)) < TOL


def test_a_bad_autosave_file_stops_the_ioc_before_it_serves(ebs, tmp_path, capsys):
    """``acc-bluesky ioc`` refuses the file (exit 2, a message naming file, key, value and what to do) before it
    builds a twin or a record: checked in this process, through the command's own entry point."""
    from acc_bluesky.ioc.app import main
    from acc_bluesky.ioc.autosave import FORMAT

    n = len(ebs.families["QD3"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": FORMAT, "profile": ebs.name,
                               "families": {"QD3": {"setpoints": [0.1] * (n - 1)}}}))
    assert main(["serve", "ebs", "--realtime", "--autosave", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"autosave file {bad}: families.QD3.setpoints: {n - 1} values, the family has {n} magnets" in err
    assert "nothing was restored" in err
    assert main(["serve", "ebs", "--realtime", "--autosave", str(tmp_path / "no" / "such.json")]) == 2
    assert "folder" in capsys.readouterr().err
