"""Machine plan stubs (never open a run): read the orbit, snapshot/restore setpoints, move families and
correctors, check limits, and the ``restoring`` wrapper every tool uses.

All values in hardware units: magnets [A], RF frequency [Hz], RF voltage [V], orbit [m].
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import Msg, MsgGenerator
from ophyd_async.core import AsyncStatus

from ..data.run_engine import EventArray
from ..devices.described import read_cached
from ..devices.magnet import Magnet
from ..profile import LimitError

__all__ = [
    "BeamLostError",
    "RestoreError",
    "Record",
    "emit",
    "read_orbit",
    "check_orbit",
    "snapshot_setpoints",
    "restore_setpoints",
    "set_family",
    "step_corrector",
    "check_limits",
    "restoring",
    "resolve_corrector",
    "all_families",
    "move",
]

RF_FREQUENCY = "RF:frequency"
RF_VOLTAGE = "RF:voltage"


class RestoreError(RuntimeError):
    """Setpoints that could not be put back. ``failed`` maps each name (family or ``RF:frequency``) to
    ``(target, source, error)``: the value it should have [A, Hz, V], the control-system source of its setpoint
    (the PV) and why it failed. Everything else of the snapshot was restored."""

    def __init__(self, failed: Mapping[str, tuple[Any, str, BaseException]], restored: Sequence[str] = ()):
        self.failed = dict(failed)
        self.restored = list(restored)
        lines = []
        for name, (target, source, err) in self.failed.items():
            shown = (f"{np.array2string(np.asarray(target), threshold=6, precision=6)}"
                     if np.ndim(target) else f"{float(target):.10g}")
            lines.append(f"  {name} ({source}): should be {shown}; {type(err).__name__}: {err}")
        super().__init__(
            f"could not restore {len(self.failed)} setting(s); put them back by hand (or restore_config of the "
            f"saved configuration) once the control system answers:\n" + "\n".join(lines)
            + (f"\nrestored: {', '.join(self.restored)}" if self.restored else ""))


class BeamLostError(RuntimeError):
    """The orbit reads NaN at in-service BPMs: the beam is lost (or those BPMs died). ``bpms`` lists them."""

    def __init__(self, message: str, bpms: Sequence[str] = ()):
        super().__init__(message)
        self.bpms = list(bpms)


class Record:
    """A readable holding values a plan computed (orbits at ±delta, steps, rms...), so they become event data.

    Each field has units, a shape and a description (what it means), so every data key in the run says what it
    is. Data keys are ``<name>-<field>`` unless ``prefix=False``.

    Args:
        name: device name (prefix of the data keys).
        fields: ``{field: (units, shape, description)}``; shape ``()`` for a number, ``(n,)`` for an array.
        hinted: fields shown by LiveTable / BestEffortCallback.
        dtypes: optional ``{field: "integer"}`` for integer fields.
    """

    parent = None

    def __init__(self, name: str, fields: Mapping[str, tuple[str, tuple[int, ...], str]],
                 hinted: Sequence[str] = (), dtypes: Mapping[str, str] | None = None, prefix: bool = True):
        self.name = name
        self._fields = {k: (u, tuple(int(s) for s in shape), d) for k, (u, shape, d) in fields.items()}
        self._dtypes = dict(dtypes or {})
        self._prefix = prefix
        self._values: dict[str, Any] = {}
        for k, (_, shape, _) in self._fields.items():
            self._values[k] = np.full(shape, np.nan) if shape else float("nan")
        self.hints = {"fields": [self.key(h) for h in hinted]}

    def key(self, field: str) -> str:
        return f"{self.name}-{field}" if self._prefix else field

    def update(self, **values: Any) -> None:
        """Set the values the next read reports (arrays are copied)."""
        for k, v in values.items():
            if k not in self._fields:
                raise KeyError(f"{self.name}: unknown field {k!r}; fields: {sorted(self._fields)}")
            shape = self._fields[k][1]
            if shape:
                a = np.asarray(v, dtype=float)
                if a.shape != shape:
                    raise ValueError(f"{self.name}.{k}: expected shape {shape}, got {a.shape}")
                self._values[k] = a.copy()
            elif self._dtypes.get(k) == "integer":
                self._values[k] = int(v)
            else:
                self._values[k] = float(v)

    def read(self) -> dict[str, dict[str, Any]]:
        # arrays go out as short-printing views, see EventArray
        t = time.time()
        return {self.key(k): {"value": v.copy().view(EventArray) if isinstance(v, np.ndarray) else v,
                              "timestamp": t}
                for k, v in self._values.items()}

    def describe(self) -> dict[str, dict[str, Any]]:
        out = {}
        for k, (u, shape, d) in self._fields.items():
            integer = self._dtypes.get(k) == "integer"
            out[self.key(k)] = {
                "source": f"acc_bluesky:{self.name}",
                "dtype": "array" if shape else ("integer" if integer else "number"),
                "shape": list(shape),
                "dtype_numpy": "<i8" if integer else "<f8",
                "units": u,
                "description": d,
            }
        return out


# The stubs below yield bluesky messages directly: ``bluesky.plan_stubs`` helpers are wrapped by ``@plan``, which
# formats the Python stack at every call (~0.3 ms); in a 448-corrector ORM that is several per step.
_GROUPS = iter(range(1 << 62))


class _DirectPut:
    """A magnet whose supply has no ramp, moved as its own ``set`` moves it -- limits checked, then the backend's
    put awaited (``_MagnetLogic``), failures raised at the wait -- without what ``StandardMovable.set`` adds around
    it: the readback and units read first and the readback watched during the move, for progress bars of a move
    that completes at once. A third of the RunEngine's cost of a corrector step (ORM: 1.5 steps per orbit)."""

    __slots__ = ("__weakref__", "magnet")

    def __init__(self, magnet: Magnet) -> None:
        self.magnet = magnet

    @property
    def name(self) -> str:
        return self.magnet.name

    @property
    def parent(self) -> Any:
        return self.magnet.parent

    def set(self, value: float) -> AsyncStatus:
        return AsyncStatus(self._move(value), name=self.magnet.name)

    async def _move(self, value: float) -> None:
        m = self.magnet
        m.limits.check(m.name or m.device_name, value, m.units)
        await m._put(float(value))

    async def stop(self, success: bool = False) -> None:
        await self.magnet.stop(success=success)

    def __repr__(self) -> str:
        return f"_DirectPut({self.magnet!r})"


_DIRECT: weakref.WeakKeyDictionary[Any, _DirectPut] = weakref.WeakKeyDictionary()


def _movable(obj: Any) -> Any:
    """What a move sets: a magnet without ramp through :class:`_DirectPut`, anything else itself."""
    if isinstance(obj, Magnet) and not obj.ramp_rate and obj.local_puts:  # (a live supply goes through its set:
        # the readback read first is what names an unreachable control system)
        direct = _DIRECT.get(obj)
        if direct is None:
            direct = _DIRECT[obj] = _DirectPut(obj)
        return direct
    return obj


def move(*args: Any) -> MsgGenerator[None]:
    """Move ``obj1, value1, obj2, value2, ...`` in parallel and wait (``bps.mv`` without the overhead).

    Magnets of the twin without ramp are put directly (:class:`_DirectPut`: the same limits and put as their
    ``set``); live ones (EPICS, Tango) through their ``set``."""
    if len(args) % 2:
        raise ValueError("move takes pairs: device, value, device, value, ...")
    group = f"acc-move-{next(_GROUPS)}"
    for obj, value in zip(args[::2], args[1::2]):
        yield Msg("set", _movable(obj), value, group=group)
    yield Msg("wait", None, group=group)


def emit(*readables: Any, stream: str = "primary") -> MsgGenerator[dict[str, Any]]:
    """One event in ``stream`` from ``readables`` (no trigger: values already set or cheap to read)."""
    yield Msg("create", name=stream)
    out: dict[str, Any] = {}
    for r in readables:
        ret = yield Msg("read", r)
        if ret:
            out.update(ret)
    yield Msg("save")
    return out


class _OrbitReader:
    """The ``x`` and ``y`` signals of the machine's :class:`~acc_bluesky.devices.Orbit`, read as the device reads
    them (uncached on the twin, the monitor's cache when staged), in its order (x then y: the twin's noise is drawn
    in read order), one message; not its rms signals (each reads the orbit again), which :func:`read_orbit` never
    uses."""

    __slots__ = ("__weakref__", "_cached", "keys", "orbit")

    def __init__(self, orbit: Any, backend: Any) -> None:
        self.orbit = orbit
        self.keys = (orbit.x.name, orbit.y.name)
        self._cached = read_cached(backend)

    @property
    def name(self) -> str:
        return self.orbit.name

    @property
    def parent(self) -> Any:
        return None

    async def read(self) -> dict[str, Any]:
        out = dict(await self.orbit.x.read(cached=self._cached))
        out.update(await self.orbit.y.read(cached=self._cached))
        return out

    async def describe(self) -> dict[str, Any]:
        out = dict(await self.orbit.x.describe())
        out.update(await self.orbit.y.describe())
        return out


_READERS: weakref.WeakKeyDictionary[Any, _OrbitReader] = weakref.WeakKeyDictionary()


def _orbit_reader(machine) -> _OrbitReader:
    reader = _READERS.get(machine.bpm)
    if reader is None:
        reader = _READERS[machine.bpm] = _OrbitReader(machine.bpm, getattr(machine, "backend", None))
    return reader


def _bpm_names(machine, idx: Iterable[int]) -> list[str]:
    names = machine.bpm.names
    return [names[i] for i in idx]


def read_orbit(machine, n_avg: int = 1, check: bool = True, *, ignore: Iterable[int] = (),
               period: float | None = None, where: str = "") -> MsgGenerator[tuple[np.ndarray, np.ndarray]]:
    """Read the orbit (x, y) [m] at every BPM, averaged over ``n_avg`` acquisitions.

    Args:
        machine: the connected machine.
        n_avg: number of acquisitions averaged.
        check: raise :class:`BeamLostError` if an in-service BPM reads NaN.
        ignore: more BPM indices excluded from the check (BPMs the caller already excludes).
        period: wait [s] before each acquisition (default ``1 / profile.bpm.rate`` when the BPMs acquire at a
            rate: every reading is then a fresh acquisition, taken after whatever the plan moved before; 0 when
            every read is a fresh acquisition).
        where: what the plan was doing, for the error message.

    BPMs out of service (profile ``bpm.status.bad``) are excluded from the check; their values are returned as
    read (usually NaN).
    """
    n_avg = int(n_avg)
    if n_avg < 1:
        raise ValueError(f"n_avg must be >= 1, got {n_avg!r}")
    if period is None:
        rate = machine.profile.spec.bpm.rate
        period = 1.0 / rate if rate else 0.0
    reader = _orbit_reader(machine)
    kx, ky = reader.keys
    sx = sy = None
    for _ in range(n_avg):
        if period:
            yield Msg("sleep", None, period)
        ret = yield Msg("read", reader)
        if ret is None:  # plan iterated without a RunEngine (list(plan))
            n = len(machine.bpm)
            return np.zeros(n), np.zeros(n)
        x = np.asarray(ret[kx]["value"], dtype=float)
        y = np.asarray(ret[ky]["value"], dtype=float)
        sx = x.copy() if sx is None else sx + x
        sy = y.copy() if sy is None else sy + y
    x, y = sx / n_avg, sy / n_avg
    if check:
        check_orbit(machine, x, y, ignore=ignore, where=where)
    return x, y


def check_orbit(machine, x: np.ndarray, y: np.ndarray, *, ignore: Iterable[int] = (), where: str = "") -> None:
    """Raise :class:`BeamLostError` if an in-service BPM (not in ``ignore``) reads NaN in ``x`` or ``y`` [m]: what
    :func:`read_orbit` checks, for code that reads the orbit itself (the ORM steps)."""
    if np.isfinite(x).all() and np.isfinite(y).all():
        return
    good = np.asarray(machine.bpm.good, dtype=bool).copy()
    ign = list(ignore)
    if ign:
        good[ign] = False
    bad = good & ~(np.isfinite(x) & np.isfinite(y))
    if np.any(bad):
        idx = np.nonzero(bad)[0]
        names = _bpm_names(machine, idx)
        shown = ", ".join(names[:10]) + (f" ... ({len(names)} BPMs)" if len(names) > 10 else "")
        doing = f" while {where}" if where else ""
        if idx.size == int(good.sum()):
            msg = (f"beam lost{doing}: all {idx.size} in-service BPMs read NaN. The plan stops and restores "
                   "every setpoint it changed; the data taken so far are in the run. Refill (on the twin: "
                   "machine.twin.inject()) and retry.")
        else:
            msg = (f"{idx.size} in-service BPM(s) read NaN{doing}: {shown}. Beam partly lost or BPMs dead: "
                   "mark dead BPMs out of service (profile bpm.status.bad) or exclude them, then retry. The "
                   "plan stops and restores every setpoint it changed.")
        raise BeamLostError(msg, names)


def all_families(machine) -> list[str]:
    """Names of every magnet family of the machine."""
    return list(machine.families)


def snapshot_setpoints(machine, families: Iterable[str] | None = None,
                       rf: bool = True) -> MsgGenerator[dict[str, Any]]:
    """Hardware setpoints of ``families`` (default: all) ``{family: (n,) [A]}`` and, with ``rf``,
    ``"RF:frequency"`` [Hz] and ``"RF:voltage"`` [V] (the layout of ``Twin.snapshot()``)."""
    names = all_families(machine) if families is None else list(families)
    snap: dict[str, Any] = {}
    for n in names:
        fam = machine.family(n)
        v = yield from bps.rd(fam.setpoints)
        snap[n] = np.array(v, dtype=float)
    if rf:
        snap[RF_FREQUENCY] = float((yield from bps.rd(machine.rf.frequency)))
        snap[RF_VOLTAGE] = float((yield from bps.rd(machine.rf.voltage)))
    return snap


def restore_setpoints(machine, snapshot: Mapping[str, Any], only_changed: bool = True,
                      group: str | None = None) -> MsgGenerator[dict[str, Any]]:
    """Put back exactly the setpoints of a :func:`snapshot_setpoints` snapshot (all in parallel, then wait).

    Args:
        machine: the connected machine.
        snapshot: ``{family: array, "RF:frequency": Hz, "RF:voltage": V}`` (any subset).
        only_changed: read the present setpoints first and move only what differs.
        group: bluesky wait group (default: a private one).

    Returns:
        ``{name: (before, after)}`` of what was moved.

    Raises:
        RestoreError: some items could not be put back (control system down...): every item is tried, and the
            error lists each failed one with its target value and PV, and what was restored.
    """
    group = group or f"restore-{id(snapshot)}-{time.monotonic_ns()}"
    moved: dict[str, Any] = {}
    failed: dict[str, tuple[Any, str, BaseException]] = {}
    setters: dict[str, Any] = {}  # name -> its setpoint signal (read back to find what did not arrive)
    for key, value in snapshot.items():  # every item is tried, whatever failed before it
        if key in (RF_FREQUENCY, RF_VOLTAGE):
            sig = machine.rf.frequency if key == RF_FREQUENCY else machine.rf.voltage
            obj, target = (machine.rf if key == RF_FREQUENCY else sig), float(value)
        else:
            fam = machine.family(key)
            sig, obj, target = fam.setpoints, fam, np.array(value, dtype=float)
        setters[key] = sig
        try:
            now = (yield from bps.rd(sig)) if only_changed else None
            if now is None or np.shape(now) != np.shape(target) or not np.array_equal(now, target):
                yield from bps.abs_set(obj, target, group=group)
                moved[key] = (None if now is None else (np.array(now, dtype=float) if np.ndim(target) else float(now)),
                              target)
        except Exception as err:  # noqa: BLE001 - collected and reported together below
            failed[key] = (target, _source(sig), err)
    if moved:
        try:
            yield from bps.wait(group=group)
        except Exception as err:  # noqa: BLE001 - find which ones did not arrive
            for key, (_, target) in moved.items():
                try:
                    now = yield from bps.rd(setters[key])
                    if not np.array_equal(np.asarray(now, dtype=float), target):
                        failed[key] = (target, _source(setters[key]), err)
                except Exception as err2:  # noqa: BLE001
                    failed[key] = (target, _source(setters[key]), err2)
    if failed:
        raise RestoreError(failed, [k for k in snapshot if k not in failed])
    return moved


def _source(signal: Any) -> str:
    src = getattr(signal, "source", "")
    return str(src).split("://", 1)[-1] or getattr(signal, "name", "?")


def check_limits(device: Any, values: Any, what: str = "") -> None:
    """Raise :class:`~acc_bluesky.profile.LimitError` (naming device, value, limits) before anything moves.

    ``device``: a magnet family (``values`` an array), a single magnet/corrector, or the RF cavity (Hz).
    """
    lim = getattr(device, "limits", None) or getattr(device, "frequency_limits", None)
    if lim is None:
        return
    label = getattr(device, "family_name", None) or getattr(device, "device_name", None) or device.name
    units = getattr(device, "units", "Hz")
    try:
        lim.check(label, values, units, names=getattr(device, "names", None))
    except LimitError as err:
        raise LimitError(f"{what}: {err}" if what else str(err)) from None


def set_family(family: Any, values: Any, *, group: str | None = None, wait: bool = True) -> MsgGenerator[None]:
    """Put a whole family's setpoints [A] in one go (one put, one recomputation); limits checked first."""
    v = np.asarray(values, dtype=float)
    check_limits(family, v)
    yield from bps.abs_set(family, v, group=group, wait=wait)


def resolve_corrector(machine, corrector: Any):
    """A Corrector device from a device, a device name (``"HST_003"``) or ``(family, index)``."""
    if hasattr(corrector, "setpoint") and hasattr(corrector, "device_name"):
        return corrector
    if isinstance(corrector, tuple):
        fam, idx = corrector
        f = machine.family(fam)
        return f[f.index_of(idx)]
    return machine.device(str(corrector))


def step_corrector(machine, corrector: Any, delta: float, *, wait: bool = True,
                   group: str | None = None) -> MsgGenerator[float]:
    """Move one corrector by ``delta`` [A] from its present setpoint; returns the new setpoint [A]."""
    dev = resolve_corrector(machine, corrector)
    now = float((yield from bps.rd(dev.setpoint)))
    new = now + float(delta)
    check_limits(dev, new)
    yield from bps.abs_set(dev, new, group=group, wait=wait)
    return new


def restoring(machine, plan: Any, families: Iterable[str] | None = None, *, rf: bool = True,
              on_success: bool = True, snapshot: dict[str, Any] | None = None) -> MsgGenerator[Any]:
    """Run ``plan`` and put back every setpoint it may touch, exactly, when it ends.

    The snapshot (``families``: default all magnet families; ``rf``: RF frequency and voltage) is read before the
    plan starts (or passed in ``snapshot``); the restore runs in a ``finalize_wrapper``, i.e. also on abort, stop,
    pause + abort and exceptions. With ``on_success=False`` (corrections, bumps, config restores) the machine keeps
    the new settings when the plan completes and is restored only when it did not.

    Returns what ``plan`` returns (e.g. the run uid).
    """
    state: dict[str, Any] = {"done": False, "snap": snapshot}

    def body():
        if state["snap"] is None:
            state["snap"] = yield from snapshot_setpoints(machine, families, rf=rf)
        ret = yield from plan
        state["done"] = True
        return ret

    def cleanup():
        if state["snap"] is None:
            return
        if state["done"] and not on_success:
            return
        yield from restore_setpoints(machine, state["snap"])

    return (yield from bpp.finalize_wrapper(body(), cleanup()))
