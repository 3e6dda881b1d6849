"""Tango backend: the same signals on Tango attributes named by the profile's Tango templates.

Names: :func:`tango_names` is the one table of every attribute (``domain/family/member/attribute``, keyed as
:func:`~acc_bluesky.devices.backends.epics.pv_names`), shared by this backend and ``acc-bluesky tango-server``.
Where the devices are: ``address="host:port"`` of a device server without a database (the twin's server,
``tango://host:port/...#dbase=no``), or the Tango database (``address`` of the database with ``database=True``,
or ``$TANGO_HOST`` when no address is given).

Signals are ophyd-async's public ``TangoSignalBackend`` on shared device proxies (one per Tango device), each
wrapped in :class:`TangoAttributeBackend`, which adds what a middle layer needs:

- a timeout on every read and write: a device server that died or hangs raises :class:`TangoUnreachable` naming
  the attribute within ``timeout`` (reads) or ``put_timeout`` (writes), never a hang;
- a write the server refuses (``API_WAttrOutsideLimit`` past the attribute's min/max value, or the server's own
  checks) raises :class:`TangoWriteRefused` naming the attribute, the value, the server's reason and the limits;
- the attribute quality as bluesky's alarm severity (VALID 0, WARNING 1, ALARM 2, INVALID 3, CHANGING 0), and an
  INVALID reading (Tango sends no value) as NaN, as the devices read a BPM without beam on the twin;
- units and limits from the attribute configuration (the profile's units where the attribute has none; a unit
  that converts to the profile's with a factor other than 1 is refused at connection);
- change events probed once per kind of attribute (template), not once per attribute: events where the server
  pushes them, else polling every ``poll_period``.

Reads are not staged into a monitor cache (:attr:`TangoBackend.stage_signals` is False): each read asks the
server, which answers with its latest published value. A cached read could lag a completed write, because the
change event travels on another socket (ZMQ) than the write's reply (CORBA). Monitors (``subscribe``, live
views, move watchers) use the change events.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from ophyd_async.core import Array1D, NotConnectedError, SignalBackend, SignalR, SignalRW, make_datakey

from ...profile import Profile

__all__ = ["TangoBackend", "TangoAttributeBackend", "TangoUnreachable", "TangoWriteRefused", "tango_names",
           "magnet_key", "bpm_key", "split_attribute", "may_share", "QUALITY_SEVERITY"]

FloatArray = Array1D[np.float64]

#: Tango ``AttrQuality`` (VALID 0, INVALID 1, ALARM 2, CHANGING 3, WARNING 4) -> bluesky alarm severity.
QUALITY_SEVERITY = {0: 0, 1: 3, 2: 2, 3: 0, 4: 1}

def may_share(key1: str, key2: str) -> bool:
    """Whether two keys of :func:`tango_names` may name one attribute: a setpoint and its readback (one read-write
    attribute: read = the readback, write value = the setpoint), of one magnet, one family or the RF frequency."""
    pair = {key1, key2}
    if pair == {"rf:frequency", "rf:frequency_rb"}:
        return True
    a, b = sorted(pair)
    for sp, rb in ((":readback", ":setpoint"), (":readbacks", ":setpoints")):
        if a.endswith(sp) and b.endswith(rb) and a[: -len(sp)] == b[: -len(rb)]:
            return True
    return False


_PART = re.compile(r"^[A-Za-z0-9_.:+\-]+$")


class TangoUnreachable(ConnectionError):
    """A Tango attribute did not answer a read or a write (its device server is down, hung or unreachable);
    ``trls`` names it."""

    def __init__(self, message: str, trls: list[str]):
        super().__init__(message)
        self.trls = list(trls)


class TangoWriteRefused(ValueError):
    """The device server refused a write (a value past the attribute's limits, or refused by the server);
    ``trl`` names the attribute, ``reason`` is Tango's (e.g. ``API_WAttrOutsideLimit``)."""

    def __init__(self, message: str, trl: str, reason: str):
        super().__init__(message)
        self.trl = trl
        self.reason = reason


def magnet_key(family: str, index: int, what: str) -> str:
    """Key of one magnet's attribute in :func:`tango_names` (``what``: ``setpoint`` or ``readback``; 0-based
    ``index``): the keys of ``pv_names``."""
    return f"{family}:{index + 1:03d}:{what}"


def bpm_key(index: int, plane: str) -> str:
    """Key of one BPM's attribute in :func:`tango_names` (0-based ``index``, ``plane`` x or y)."""
    return f"BPM:{index + 1:03d}:{plane}"


def split_attribute(name: str) -> tuple[str, str]:
    """``"d/f/m/attr"`` -> ``("d/f/m", "attr")``."""
    device, _, attr = name.rpartition("/")
    return device, attr


def _magnet_fields(profile: Profile, family: str, index: int) -> dict[str, Any]:
    fields = getattr(profile, "pv_fields", None)
    if fields is not None:
        kw = dict(fields(family, index))
    else:
        fam = profile.families[family]
        e = fam.element_names[index]
        kw = {"family": family, "index": index + 1, "device": fam.device_names[index], "element": e, "name": e}
    kw.pop("prefix", None)
    return kw


def _bpm_fields(profile: Profile, index: int, elements: Callable[[], list[str]]) -> dict[str, Any]:
    fields = getattr(profile, "bpm_pv_fields", None)
    if fields is not None:
        kw = dict(fields(index))
    else:
        e = elements()[index]
        kw = {"family": "BPM", "index": index + 1, "device": profile.bpm_names[index], "element": e, "name": e}
    kw.pop("prefix", None)
    return kw


def tango_names(profile: Profile, domain: str | None = None) -> dict[str, str]:
    """Every Tango attribute of a profile: logical key (those of ``pv_names``) -> ``domain/family/member/attr``.

    Names come from the profile's ``controls.tango_*`` templates with its device names; ``domain`` overrides
    ``controls.tango_domain``. Tango names are case-insensitive: two keys naming the same attribute (other than a
    setpoint and its readback, :func:`may_share`) or a name that is not ``domain/family/member/attribute`` raise
    ``ValueError`` naming them.
    """
    c = profile.spec.controls
    d = c.tango_domain if domain is None else domain
    out: dict[str, str] = {}
    for fname, fam in profile.families.items():
        for i in range(len(fam.element_names)):
            kw = _magnet_fields(profile, fname, i) | {"domain": d}
            out[magnet_key(fname, i, "setpoint")] = c.tango_magnet_setpoint.format(**kw)
            out[magnet_key(fname, i, "readback")] = c.tango_magnet_readback.format(**kw)
        out[f"{fname}:setpoints"] = c.tango_family_setpoints.format(domain=d, family=fname)
        out[f"{fname}:readbacks"] = c.tango_family_readbacks.format(domain=d, family=fname)
    cache: list[list[str]] = []

    def elements() -> list[str]:  # BPM element names, only for profiles without bpm_pv_fields
        if not cache:
            ring = profile.load_lattice()
            cache.append([ring[int(r)].FamName for r in profile.bpm_refpts])
        return cache[0]

    for i in range(len(profile.bpm_refpts)):
        kw = _bpm_fields(profile, i, elements) | {"domain": d}
        out[bpm_key(i, "x")] = c.tango_bpm_x.format(**kw)
        out[bpm_key(i, "y")] = c.tango_bpm_y.format(**kw)
    for key, attr in (("orbit:x", "tango_orbit_x"), ("orbit:y", "tango_orbit_y"),
                      ("rf:frequency", "tango_rf_frequency"), ("rf:frequency_rb", "tango_rf_frequency_rb"),
                      ("rf:voltage", "tango_rf_voltage"),
                      ("tune:x", "tango_tune_x"), ("tune:y", "tango_tune_y"), ("beam:current", "tango_beam_current"),
                      ("beam:lifetime", "tango_beam_lifetime")):
        out[key] = getattr(c, attr).format(domain=d)
    _check_names(out)
    return out


def _check_names(names: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for key, name in names.items():
        parts = name.split("/")
        if len(parts) != 4 or not all(_PART.match(p) for p in parts):
            raise ValueError(f"Tango name {name!r} (key {key!r}) is not domain/family/member/attribute (4 parts of "
                             "letters, digits and _ . : + -): check the profile's controls.tango_* templates and "
                             "its device names")
        low = name.lower()
        other = seen.get(low)
        if other is not None and not may_share(other, key):
            raise ValueError(f"Tango attribute {name!r} is named by both {other!r} and {key!r} (Tango names are "
                             "case-insensitive): the profile's controls.tango_* templates must give every magnet, "
                             "BPM and family its own attribute")
        seen[low] = key


def _short(value) -> str:
    if isinstance(value, np.ndarray) and value.size > 3:
        return f"<{value.size} values>"
    return repr(value)


def _dev_failed(err: BaseException) -> Any:
    """The ``DevFailed`` behind ``err`` (ophyd-async wraps a failed write in a RuntimeError), or None."""
    from tango import DevFailed

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DevFailed):
            return err
        err = err.__cause__ if err.__cause__ is not None else err.__context__
    return None


def _is_connection_error(df: Any) -> bool:
    from tango import CommunicationFailed, ConnectionFailed

    if isinstance(df, (ConnectionFailed, CommunicationFailed)):
        return True
    reasons = {getattr(e, "reason", "") for e in getattr(df, "args", ())}
    return bool(reasons & {"API_CorbaException", "API_CantConnectToDevice", "API_DeviceNotExported",
                           "API_DeviceTimedOut", "API_ServerNotRunning", "API_ConnectionFailed",
                           "API_CommunicationFailed", "API_DeviceNotDefined"})


def _desc(df: Any) -> str:
    """The first line of the first two errors of a DevFailed (Tango appends its reconnection notes below)."""
    errs = getattr(df, "args", ())
    lines = [str(getattr(e, "desc", e)).strip().splitlines()[0] for e in errs[:2] if str(getattr(e, "desc", e)).strip()]
    return "; ".join(lines) or str(df).strip().splitlines()[0]


def _units_factor(have: str, want: str) -> float | None:
    """How many ``want`` one ``have`` is (None when pint cannot tell)."""
    try:
        import pint

        ureg = _UREG.get("u")
        if ureg is None:
            ureg = _UREG["u"] = pint.UnitRegistry()
        return float(ureg.Quantity(1.0, have).to(want).magnitude)
    except Exception:  # noqa: BLE001 - unknown spellings, dimensionless mismatch: cannot tell
        return None


_UREG: dict[str, Any] = {}


async def _drop(_event) -> None:
    """Callback of the probe subscriptions (a coroutine: the proxies are asyncio ones)."""


class TangoAttributeBackend(SignalBackend):
    """One signal on one Tango attribute (or a read and a write attribute): ophyd-async's ``TangoSignalBackend``
    with timeouts, clear errors, quality and units mapped (see the module docstring)."""

    def __init__(self, owner: TangoBackend, datatype, read_name: str, write_name: str, kind: str,
                 units: str | None = None, length: int | None = None, write_value: bool = False):
        self.owner = owner
        self.write_value = write_value  # reads give the attribute's write value (a setpoint on a measured attribute)
        self.read_name, self.write_name = read_name, write_name
        self.read_trl, self.write_trl = owner.trl(read_name), owner.trl(write_name)
        self.kind = kind
        self.units = units
        self.length = length
        self.inner = None
        super().__init__(datatype)

    def source(self, name: str, read: bool) -> str:
        return self.read_trl if read else self.write_trl

    # connection -------------------------------------------------------------------------------------------
    async def connect(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._connect(timeout), timeout)
        except NotConnectedError:
            raise
        except TimeoutError:
            raise NotConnectedError(f"{self.read_trl}: no answer within {timeout:g} s. {self.owner.hint()}") from None
        except Exception as err:  # noqa: BLE001 - DevFailed, type mismatches: say which attribute
            df = _dev_failed(err)
            why = _desc(df) if df is not None else f"{type(err).__name__}: {err}"
            raise NotConnectedError(f"{self.read_trl}: {why}. {self.owner.hint()}") from err

    async def _connect(self, timeout: float) -> None:
        from ophyd_async.tango.core import TangoSignalBackend

        device, attr = split_attribute(self.read_name)
        proxy = await self.owner.device_proxy(device, timeout)
        events = await self.owner.events_supported(self.kind, proxy, attr)
        if self.read_name.lower() == self.write_name.lower():
            inner = TangoSignalBackend(self.datatype, self.read_trl, self.read_trl,
                                       device_proxy=_ProbedAttributeProxy(proxy, attr))
        else:
            inner = TangoSignalBackend(self.datatype, self.read_trl, self.write_trl)
        inner.allow_events(events)
        inner.set_polling(not events, self.owner.poll_period, None, None)
        await inner.connect(timeout)
        cfg = inner.trl_configs[self.read_trl]
        unit = str(getattr(cfg, "unit", "") or "")
        if unit and self.units and unit != self.units:
            factor = _units_factor(unit, self.units)
            if factor is not None and not math.isclose(factor, 1.0, rel_tol=1e-12):
                raise NotConnectedError(
                    f"{self.read_trl}: the attribute is in {unit!r}, the profile expects {self.units!r} (1 {unit} = "
                    f"{factor:g} {self.units}); fix the profile's units or point the template at an attribute in "
                    f"{self.units!r}")
        if self.length is None and get_max_dim(cfg) > 0 and _is_spectrum(cfg):
            self.length = get_max_dim(cfg)
        self.inner = inner

    def _need(self):
        if self.inner is None:
            raise NotConnectedError(f"{self.read_trl}: not connected")
        return self.inner

    # reads ------------------------------------------------------------------------------------------------
    def _nan(self):
        if self.datatype is float:
            return float("nan")
        return np.full(self.length or 0, np.nan)

    def _value(self, value):
        return self._nan() if value is None else value

    def _map(self, reading) -> dict[str, Any]:
        r = dict(reading)
        r["value"] = self._value(r.get("value"))
        q = r.get("alarm_severity", 0)
        r["alarm_severity"] = QUALITY_SEVERITY.get(int(q), 0) if q is not None else 0
        if isinstance(r["value"], np.ndarray) and r["value"].size:
            self.length = int(r["value"].size)
        return r

    async def _call(self, coro, trl: str, what: str, timeout: float):
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError as err:
            raise TangoUnreachable(f"{trl}: {what} failed (no reply; timeout {timeout:g} s). {self.owner.hint()}",
                                   [trl]) from err
        except Exception as err:  # noqa: BLE001 - DevFailed of a dead server: say so, name the attribute
            df = _dev_failed(err)
            if (df is not None and _is_connection_error(df)) or not await self.owner.answers(trl):
                why = _desc(df) if df is not None else f"{type(err).__name__}: {err}"
                raise TangoUnreachable(f"{trl}: {what} failed ({why}). {self.owner.hint()}", [trl]) from err
            raise

    async def get_reading(self):
        inner = self._need()
        reading = await self._call(inner.get_reading(), self.read_trl, "read", self.owner.timeout)
        if self.write_value:
            reading = dict(reading)
            reading["value"] = await self._call(inner.get_setpoint(), self.write_trl, "read of the write value",
                                                self.owner.timeout)
        return self._map(reading)

    async def get_value(self):
        return (await self.get_reading())["value"]

    async def get_setpoint(self):
        inner = self._need()
        value = await self._call(inner.get_setpoint(), self.write_trl, "read of the setpoint", self.owner.timeout)
        return self._value(value)

    async def get_datakey(self, source: str):
        inner = self._need()
        from ophyd_async.tango.core import get_source_metadata

        reading = await self.get_reading()
        md = dict(get_source_metadata(self.read_trl, inner.trl_configs))
        if not md.get("units") and self.units is not None:
            md["units"] = self.units
        return make_datakey(self.datatype, reading["value"], source, metadata=md)

    # writes -----------------------------------------------------------------------------------------------
    async def put(self, value) -> None:
        inner = self._need()
        op = f"write of {_short(value)}"
        t = self.owner.put_timeout
        try:
            await asyncio.wait_for(inner.put(value, None), t)
        except TimeoutError as err:
            raise TangoUnreachable(f"{self.write_trl}: {op} failed (no reply; timeout {t:g} s). {self.owner.hint()}",
                                   [self.write_trl]) from err
        except Exception as err:  # noqa: BLE001 - classify the DevFailed behind it
            df = _dev_failed(err)
            # a server killed during the write can fail it with any reason (or none): ask the server before
            # calling it a refusal
            if (df is not None and _is_connection_error(df)) or not await self.owner.answers(self.write_trl):
                why = _desc(df) if df is not None else f"{type(err).__name__}: {err}"
                raise TangoUnreachable(f"{self.write_trl}: {op} failed ({why}). {self.owner.hint()}",
                                       [self.write_trl]) from err
            if df is None:
                raise
            reason = str(getattr(df.args[0], "reason", "")) if df.args else ""
            raise TangoWriteRefused(f"{self.write_name}: {op} refused by the Tango server ({reason}: {_desc(df)})"
                                    f"{self._limits_text()}", self.write_trl, reason) from err

    def _limits_text(self) -> str:
        cfg = self.inner.trl_configs.get(self.write_trl) if self.inner is not None else None
        if cfg is None:
            return ""
        lo, hi = str(getattr(cfg, "min_value", "")), str(getattr(cfg, "max_value", ""))
        unit = str(getattr(cfg, "unit", "") or self.units or "")
        if lo in ("", "Not specified") and hi in ("", "Not specified"):
            return ""
        return f"; the attribute's limits are [{lo}, {hi}] {unit}".rstrip()

    # monitors ---------------------------------------------------------------------------------------------
    def set_callback(self, callback) -> None:
        inner = self._need()
        if callback is None:
            inner.set_callback(None)
        else:
            inner.set_callback(lambda reading: callback(self._map(reading)))


def get_max_dim(cfg) -> int:
    return int(getattr(cfg, "max_dim_x", 0) or 0)


def _is_spectrum(cfg) -> bool:
    from tango import AttrDataFormat

    return getattr(cfg, "data_format", None) == AttrDataFormat.SPECTRUM


def _probed_proxy_class():
    from ophyd_async.tango.core import AttributeProxy

    class ProbedAttributeProxy(AttributeProxy):
        """ophyd-async's attribute proxy on a device proxy shared by the device's signals; whether the attribute
        sends change events was probed once for its kind by :meth:`TangoBackend.events_supported` (one
        subscription per template instead of one per attribute: 2300 attributes connect in seconds)."""

        async def connect(self) -> None:
            return None

    return ProbedAttributeProxy


def _ProbedAttributeProxy(proxy, attr: str):  # noqa: N802 - a class made once, on first use (pytango is imported then)
    cls = _CLASSES.get("probed")
    if cls is None:
        cls = _CLASSES["probed"] = _probed_proxy_class()
    return cls(proxy, attr)


_CLASSES: dict[str, Any] = {}


class TangoBackend:
    """Makes the signals of every device from Tango attributes named by :func:`tango_names`.

    Args:
        profile: the profile whose templates name the attributes.
        address: ``"host:port"``: of a device server without a database (the twin's ``acc-bluesky tango-server``;
            the default with an address), or of the Tango database with ``database=True``. ``None``: the
            database of ``$TANGO_HOST``.
        database: whether ``address`` is a Tango database (default: False with an address, True without).
        domain: override the profile's ``controls.tango_domain``.
        timeout: connection and read timeout [s].
        put_timeout: write timeout [s] (a write completes once the server has applied it; default
            ``max(timeout, 10)``).
        poll_period: polling period [s] of monitored attributes whose server sends no change events.
    """

    mode = "tango"
    #: Reads ask the server (see the module docstring): devices do not stage their signals into a cache.
    stage_signals = False

    def __init__(self, profile: Profile, address: str | None = None, *, database: bool | None = None,
                 domain: str | None = None, timeout: float = 5.0, put_timeout: float | None = None,
                 poll_period: float = 0.1):
        self.profile = profile
        self.twin = None
        self.domain = profile.spec.controls.tango_domain if domain is None else domain
        self.names = tango_names(profile, self.domain)
        if address is None:
            host = os.environ.get("TANGO_HOST", "")
            if not host:
                raise ValueError("tango mode needs address='host:port' (a device server without a database, e.g. "
                                 "acc-bluesky tango-server) or $TANGO_HOST (the Tango database)")
            self.address, self.database = host.split(",")[0].strip(), True
        else:
            self.address = str(address).removeprefix("tango://").rstrip("/")
            self.database = bool(database)
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+:\d+", self.address):
            raise ValueError(f"Tango address {self.address!r}: expected host:port, e.g. 127.0.0.1:45000")
        self.timeout = float(timeout)
        self.put_timeout = max(self.timeout, 10.0) if put_timeout is None else float(put_timeout)
        self.poll_period = float(poll_period)
        self._proxies: dict[str, asyncio.Future] = {}
        self._events: dict[str, asyncio.Future] = {}
        self._probes: list[tuple[Any, int]] = []  # (device proxy, event id) of the probe subscriptions

    def __repr__(self) -> str:
        db = "database" if self.database else "no database"
        return f"TangoBackend({self.profile.name!r}, address={self.address!r} ({db}), domain={self.domain!r})"

    # names and proxies ------------------------------------------------------------------------------------
    def trl(self, name: str) -> str:
        """Full Tango resource locator of a device or attribute name."""
        return f"tango://{self.address}/{name}" + ("" if self.database else "#dbase=no")

    def hint(self) -> str:
        if self.database:
            return f"Is the device exported in the Tango database at {self.address} and its server running?"
        return (f"Is the Tango device server running and reachable at {self.address} (acc-bluesky tango-server "
                "--port ...)?")

    async def answers(self, trl: str) -> bool:
        """Whether the device of attribute ``trl`` answers a ping now (a fresh proxy, ``timeout`` at most): tells
        a server that refused an operation from one that died during it."""
        from ophyd_async.tango.core import ensure_proper_executor
        from tango.asyncio import DeviceProxy as AsyncDeviceProxy

        device = trl.split("#", 1)[0].removeprefix("tango://").split("/", 1)[-1].rsplit("/", 1)[0]

        @ensure_proper_executor
        async def ping():
            p = await AsyncDeviceProxy(self.trl(device), timeout=self.timeout)
            p.set_timeout_millis(max(1, int(self.timeout * 1000)))
            await p.ping()

        try:
            await asyncio.wait_for(ping(), self.timeout)
        except Exception:  # noqa: BLE001 - any failure to answer is "not answering"
            return False
        return True

    async def device_proxy(self, device: str, timeout: float):
        """The asyncio DeviceProxy of ``device`` (one per device, shared by its signals)."""
        key = device.lower()
        fut = self._proxies.get(key)
        if fut is None or (fut.done() and (fut.cancelled() or fut.exception() is not None)):
            fut = self._proxies[key] = asyncio.ensure_future(self._make_proxy(device, timeout))
        return await asyncio.shield(fut)

    async def _make_proxy(self, device: str, timeout: float):
        from ophyd_async.tango.core import ensure_proper_executor
        from tango.asyncio import DeviceProxy as AsyncDeviceProxy

        @ensure_proper_executor
        async def make():
            p = await AsyncDeviceProxy(self.trl(device), timeout=timeout)
            p.set_timeout_millis(max(1, int(self.timeout * 1000)))
            return p

        try:
            return await make()
        except Exception as err:  # noqa: BLE001
            df = _dev_failed(err)
            why = _desc(df) if df is not None else f"{type(err).__name__}: {err}"
            raise NotConnectedError(f"{self.trl(device)}: cannot reach the device ({why}). {self.hint()}") from err

    async def events_supported(self, kind: str, proxy, attr: str) -> bool:
        """Whether attributes of ``kind`` (a template) send change events: one subscription probe per kind."""
        fut = self._events.get(kind)
        if fut is None:
            fut = self._events[kind] = asyncio.ensure_future(self._probe(proxy, attr))
        return await asyncio.shield(fut)

    async def _probe(self, proxy, attr: str) -> bool:
        """Subscribe to the change events of one attribute. The subscription stays open (its events are dropped):
        a subscription undone while the server's first events are in flight makes the Tango client print
        "not found in event callback map" for them."""
        from ophyd_async.tango.core import ensure_proper_executor
        from tango import EventType

        @ensure_proper_executor
        async def probe() -> bool:
            try:
                eid = await proxy.subscribe_event(attr, EventType.CHANGE_EVENT, _drop)
            except Exception:  # noqa: BLE001 - the attribute sends no change events: poll it
                return False
            self._probes.append((proxy, eid))
            return True

        return await probe()

    # signals ----------------------------------------------------------------------------------------------
    def _backend(self, datatype, key: str, write_key: str | None, kind: str, units: str | None,
                 length: int | None) -> TangoAttributeBackend:
        write_value = (kind in ("tango_magnet_setpoint", "tango_family_setpoints")
                       and self.profile.spec.controls.tango_setpoints_from_write_value)
        return TangoAttributeBackend(self, datatype, self.names[key], self.names[write_key or key], kind, units,
                                     length, write_value)

    def _r(self, datatype, key: str, kind: str, units: str | None = None, length: int | None = None) -> SignalR:
        return SignalR(self._backend(datatype, key, None, kind, units, length), timeout=None)

    def _rw(self, datatype, key: str, kind: str, units: str | None = None, length: int | None = None,
            write_key: str | None = None) -> SignalRW:
        return SignalRW(self._backend(datatype, key, write_key, kind, units, length), timeout=None)

    @staticmethod
    def _put(signal: SignalRW) -> Callable[[Any], Any]:
        async def put(value) -> None:
            await signal.set(value, timeout=None)

        return put

    def _units(self, family: str) -> str:
        return self.profile.families[family].spec.units

    def magnet_setpoint(self, family: str, index: int) -> SignalRW[float]:
        return self._rw(float, magnet_key(family, index, "setpoint"), "tango_magnet_setpoint", self._units(family))

    def magnet_readback(self, family: str, index: int) -> SignalR[float]:
        return self._r(float, magnet_key(family, index, "readback"), "tango_magnet_readback", self._units(family))

    def family_setpoints(self, family: str) -> SignalRW[FloatArray]:
        n = len(self.profile.families[family].element_names)
        return self._rw(FloatArray, f"{family}:setpoints", "tango_family_setpoints", self._units(family), n)

    def family_readbacks(self, family: str) -> SignalR[FloatArray]:
        n = len(self.profile.families[family].element_names)
        return self._r(FloatArray, f"{family}:readbacks", "tango_family_readbacks", self._units(family), n)

    def magnet_put(self, family: str, index: int, signal: SignalRW):
        return self._put(signal)

    def family_put(self, family: str, signal: SignalRW):
        return self._put(signal)

    def orbit(self, plane: str) -> SignalR[FloatArray]:
        return self._r(FloatArray, f"orbit:{plane}", f"tango_orbit_{plane}", "m", len(self.profile.bpm_refpts))

    def bpm(self, index: int, plane: str) -> SignalR[float]:
        return self._r(float, bpm_key(index, plane), f"tango_bpm_{plane}", "m")

    def rf_frequency(self) -> SignalRW[float]:
        return self._rw(float, "rf:frequency_rb", "tango_rf_frequency", "Hz", write_key="rf:frequency")

    def rf_put(self, signal: SignalRW):
        return self._put(signal)

    def rf_voltage(self) -> SignalRW[float]:
        return self._rw(float, "rf:voltage", "tango_rf_voltage", "V")

    def tune(self, plane: str) -> SignalR[float]:
        return self._r(float, f"tune:{plane}", f"tango_tune_{plane}", "")

    def beam_current(self) -> SignalR[float]:
        return self._r(float, "beam:current", "tango_beam_current", "A")

    def beam_lifetime(self) -> SignalR[float]:
        return self._r(float, "beam:lifetime", "tango_beam_lifetime", "s")
