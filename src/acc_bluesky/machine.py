"""``connect(profile, mode)`` -> :class:`Machine`: the device tree of one accelerator, on the twin or on EPICS."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np
from bluesky.run_engine import call_in_bluesky_event_loop, get_bluesky_event_loop
from ophyd_async.core import Device, DeviceMap

from .devices import (BeamCurrent, BeamLosses, BpmAcquisition, Injection, MagnetFamily, Orbit, Pinger, RfCavity,
                      SimBackend, TuneMonitor)
from .devices.magnet import Magnet
from .profile import Profile, load_profile
from .twin import Twin

__all__ = ["Machine", "connect", "bluesky_loop", "NoSuchDevice"]

MODES = ("sim", "epics", "tango")


def bluesky_loop() -> asyncio.AbstractEventLoop:
    """The bluesky event loop, started (by making a RunEngine, bluesky's public way) if none runs yet; RunEngines
    made later by :func:`acc_bluesky.make_run_engine` reuse it, so devices and plans share one loop."""
    loop = get_bluesky_event_loop()
    if loop is None or loop.is_closed() or not loop.is_running():
        from bluesky import RunEngine

        RunEngine(context_managers=[])  # sets and starts the bluesky event loop
        loop = get_bluesky_event_loop()
    return loop


class NoSuchDevice(KeyError):
    """An unknown device or family name; the message lists valid ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Families(dict):
    """Families of one kind by profile name (``m.quad["QF2"]``); an unknown name lists the valid ones."""

    def __init__(self, kind: str, items: Mapping[str, MagnetFamily]):
        super().__init__(items)
        self.kind = kind

    def __missing__(self, key):
        raise NoSuchDevice(f"unknown {self.kind} family {key!r}; valid: {sorted(self)}")


def _s_positions(profile: Profile, refpts) -> np.ndarray:
    return np.asarray(profile.s_positions(refpts), dtype=float)


class Machine(Device):
    """The device tree of one accelerator: an ophyd-async ``Device`` (``init_devices``, ``connect``, device
    lists of the queue server see it whole), whose devices keep their own names (``bpm``, ``HST``, ``HST_004``,
    ``rf`` ...: the data keys of a run do not depend on what the machine object is called).

    Attributes:
        bpm: :class:`Orbit` (x, y arrays [m]); ``bpm["BPM_005"]`` / ``bpm[4]`` is one BPM.
        hcor, vcor: the first horizontal / vertical corrector family (:class:`MagnetFamily` of
            :class:`Corrector`), A and rad; ``hcors``, ``vcors``: all of them by name.
        quad, sext: quadrupole / sextupole families by profile name (``m.quad["QF2"]``).
        families: every magnet family by profile name (a ``DeviceMap``).
        rf, tune, beam: RF (Hz, V), tune monitor, beam current (A) and lifetime (s).
        tbt, pinger, injection, losses: the BPM system's acquisition mode and turn-by-turn readout
            (:class:`BpmAcquisition`), the pinger (kicks [rad]), the injection steering (x, px, y, py, energy) and
            the beam-loss monitor (turns reached, where lost); ``None`` when the control system does not serve them
            (an EPICS profile without ``controls.beam_pvs``, Tango).
        twin: the :class:`~acc_bluesky.twin.Twin` in sim mode, ``None`` otherwise.
        profile, mode, seed: what this machine is.

    ``m.device("HST_004")`` finds any device by name (magnets, BPMs, families, ``rf`` ...).
    """

    def __init__(self, profile: Profile, mode: str, backend, seed: int | None, name: str = ""):
        self.profile = profile
        self.mode = mode
        self.seed = seed if mode == "sim" else None
        self.backend = backend
        self.twin: Twin | None = backend.twin
        e = profile.energy
        fams = {fname: MagnetFamily(backend, fam, e, s=_s_positions(profile, fam.refpts))
                for fname, fam in profile.families.items()}
        self.families = DeviceMap(fams)
        good = np.ones(len(profile.bpm_refpts), dtype=bool)
        good[list(profile.bpm_bad)] = False
        self.bpm = Orbit(backend, profile.bpm_refpts, profile.bpm_names, good,
                         s=_s_positions(profile, profile.bpm_refpts))
        rf = profile.spec.rf
        self.rf = RfCavity(backend, rf.frequency_limits, rf.voltage_limits)
        self.tune = TuneMonitor(backend)
        self.beam = BeamCurrent(backend)
        # --- tbt: beam devices (devices/beam.py) ---
        self.tbt: BpmAcquisition | None = None
        self.pinger: Pinger | None = None
        self.injection: Injection | None = None
        self.losses: BeamLosses | None = None
        if getattr(backend, "beam_devices", False):
            self.tbt = BpmAcquisition(backend, len(profile.bpm_refpts))
            self.pinger = Pinger(backend)
            self.injection = Injection(backend)
            self.losses = BeamLosses(backend)
        # --- end tbt ---
        by = lambda *t: {n: f for n, f in fams.items() if f.type in t}  # noqa: E731
        self._views = {
            "quad": _Families("quadrupole", by("quadrupole")),
            "sext": _Families("sextupole", by("sextupole")),
            "hcors": _Families("hcor", by("hcor")),
            "vcors": _Families("vcor", by("vcor")),
        }
        self._index: dict[str, Any] = {}
        super().__init__(name=name or profile.name)

    # views (not children: every family is a child of ``families`` only) -----------------------------------
    quad = property(lambda self: self._views["quad"])
    sext = property(lambda self: self._views["sext"])
    hcors = property(lambda self: self._views["hcors"])
    vcors = property(lambda self: self._views["vcors"])
    hcor = property(lambda self: next(iter(self._views["hcors"].values()), None))
    vcor = property(lambda self: next(iter(self._views["vcors"].values()), None))

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        """Name the machine; its devices keep their own names (``bpm``, the family names, ``rf``, ...)."""
        super().set_name(name, child_name_separator=child_name_separator)
        for dev_name, dev in self._top_level():
            dev.set_name(dev_name)
        self._index = {}

    def _top_level(self) -> Iterator[tuple[str, Device]]:
        yield "bpm", self.bpm
        yield from self.families.items()
        yield "rf", self.rf
        yield "tune", self.tune
        yield "beam", self.beam
        for dev_name in ("tbt", "pinger", "injection", "losses"):
            dev = getattr(self, dev_name, None)
            if dev is not None:
                yield dev_name, dev

    def __repr__(self) -> str:
        return (f"Machine({self.profile.name!r}, mode={self.mode!r}, seed={self.seed}, bpms={len(self.bpm)}, "
                f"families={list(self.families)})")

    def devices(self) -> Iterator[Device]:
        """Every top-level device (for connecting, the queue server's device list, config snapshots)."""
        for _, dev in self._top_level():
            yield dev

    def family(self, name: str) -> MagnetFamily:
        """A magnet family by profile name."""
        try:
            return self.families[name]
        except KeyError:
            raise NoSuchDevice(f"unknown family {name!r}; valid families: {sorted(self.families)}") from None

    def magnets(self) -> Iterator[Magnet]:
        """Every magnet of every family."""
        for fam in self.families.values():
            yield from fam.values()

    def device(self, name: str) -> Device:
        """Any device by its name: a magnet (``"HST_004"``), a BPM (``"BPM_005"``), a family (``"QF2"``), or
        ``"bpm"``, ``"rf"``, ``"tune"``, ``"beam"``."""
        if not self._index:
            idx: dict[str, Any] = {}
            for top_name, dev in self._top_level():
                idx[top_name] = dev
            for fam in self.families.values():
                idx.update(zip(fam.names, fam.values()))
            idx.update(zip(self.bpm.names, self.bpm.channel.values()))
            self._index = idx
        try:
            return self._index[name]
        except KeyError:
            close = [n for n in self._index if str(name).lower() in n.lower()][:6]
            raise NoSuchDevice(
                f"{self.profile.name}: no device named {name!r}" + (f"; did you mean {close}?" if close else
                f"; families: {sorted(self.families)}, BPMs {self.bpm.names[0]} ... {self.bpm.names[-1]}")
            ) from None

    async def connect_async(self, timeout: float = 10.0) -> None:
        """Connect every device; the error names each device that did not connect."""
        devs = list(self._top_level())
        results = await asyncio.gather(*(d.connect(timeout=timeout) for _, d in devs), return_exceptions=True)
        errors = [(n, r) for (n, _), r in zip(devs, results) if isinstance(r, BaseException)]
        if errors:
            lines = "\n".join(f"  {n}: {str(r)[:400]}" for n, r in errors[:5])
            hint = ("Is the IOC running and reachable (EPICS_CA_ADDR_LIST)?" if self.mode == "epics"
                    else "Is the control system reachable?")
            raise ConnectionError(
                f"{len(errors)} device(s) of {self.profile.name!r} ({self.mode}) did not connect within {timeout} s:"
                f"\n{lines}\n{hint}")


def _register(machine: Machine) -> None:
    """Tell the data layer a machine is connected: runs reading its devices get its FAIR metadata."""
    from .data import metadata

    register = getattr(metadata, "register_machine", None)
    if register is not None:
        register(machine)


def connect(profile: Profile | str, mode: Literal["sim", "epics", "tango"] = "sim", seed: int | None = None, *,
            twin: Twin | None = None, prefix: str | None = None, timeout: float = 10.0,
            error_scale: float | None = None, protocol: str = "ca",
            address: str | None = None, database: bool | None = None) -> Machine:
    """Build and connect the device tree of ``profile``.

    Args:
        profile: a profile or its name/path.
        mode: ``"sim"`` (a twin in this process) or ``"epics"`` (live PVs from the profile's templates).
        seed: sim mode: error seed (``None`` = ideal machine, no noise).
        twin: sim mode: use this twin instead of making one.
        prefix: epics mode: override the profile's PV prefix.
        timeout: connection timeout [s].
        error_scale: sim mode: multiplier on the profile's alignment errors.
        protocol: epics mode: ``"ca"`` or ``"pva"``.
        address: tango mode: ``"host:port"`` of a device server without a database (``acc-bluesky tango-server``),
            or of the Tango database with ``database=True``; default ``$TANGO_HOST`` (a database).
        database: tango mode: whether ``address`` is a Tango database (default False with an address).
    """
    prof = load_profile(profile)
    if mode == "sim":
        twin = twin or Twin(prof, seed=seed, error_scale=error_scale)
        backend = SimBackend(twin)
        seed = twin.seed
        _warn_without_beam(twin)
    elif mode == "epics":
        from .devices.backends.epics import EpicsBackend

        backend = EpicsBackend(prof, prefix=prefix, timeout=timeout, protocol=protocol)
    # --- tango: the same devices on Tango attributes (devices/backends/tango.py) ---
    elif mode == "tango":
        from .devices.backends.tango import TangoBackend

        backend = TangoBackend(prof, address, database=database, timeout=timeout)
    # --- end tango ---
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    m = Machine(prof, mode, backend, seed)
    bluesky_loop()
    call_in_bluesky_event_loop(m.connect_async(timeout=timeout))
    _register(m)
    return m


class NoClosedOrbitWarning(UserWarning):
    """The twin has no stored beam at connection (no closed orbit at these errors, or the optics unstable)."""


def _warn_without_beam(twin: Twin) -> None:
    if twin.is_ring and twin.beam_lost:
        warnings.warn(NoClosedOrbitWarning(
            f"{twin.profile.name} seed {twin.seed}: no stored beam at connection ({twin.loss_reason})"
            + ("" if "What to do" in str(twin.loss_reason) else
               ". Tools that need a closed orbit will refuse to start; lower the alignment errors (connect(..., "
               "error_scale=0.3)) or thread the first turns (plans.thread_first_turns) first.")), stacklevel=3)
