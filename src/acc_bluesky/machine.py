"""``connect(profile, mode)`` -> :class:`Machine`: the device tree of one accelerator, on the twin or on EPICS."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Literal

import numpy as np
from bluesky.run_engine import (
    _ensure_event_loop_running,
    call_in_bluesky_event_loop,
    get_bluesky_event_loop,
    set_bluesky_event_loop,
)
from ophyd_async.core import Device

from .devices import BeamCurrent, EpicsBackend, MagnetFamily, Orbit, RfCavity, SimBackend, TuneMonitor
from .profile import Profile, load_profile
from .twin import Twin

__all__ = ["Machine", "connect", "bluesky_loop"]


def bluesky_loop() -> asyncio.AbstractEventLoop:
    """The bluesky event loop (started if no RunEngine made one yet); RunEngines made later reuse it."""
    loop = get_bluesky_event_loop()
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        set_bluesky_event_loop(loop)
    _ensure_event_loop_running(loop)
    return loop


class _FamilyDict(dict):
    def __init__(self, kind: str, items: dict[str, MagnetFamily]):
        super().__init__(items)
        self.kind = kind

    def __missing__(self, key):
        raise KeyError(f"unknown {self.kind} family {key!r}; valid: {sorted(self)}")


class Machine:
    """The device tree of one accelerator.

    Attributes:
        bpm: :class:`Orbit` (x, y arrays [m]); ``bpm.channel[i]`` per BPM.
        hcor, vcor: corrector families (:class:`MagnetFamily` of :class:`Corrector`), A and rad.
        quad, sext: dicts of quadrupole / sextupole families by profile name.
        families: every magnet family by profile name.
        rf, tune, beam: RF (Hz, V), tune monitor, beam current (A) and lifetime (s).
        twin: the :class:`~acc_bluesky.twin.Twin` in sim mode, ``None`` in epics mode.
        profile, mode, seed: what this machine is.
    """

    def __init__(self, profile: Profile, mode: str, backend, seed: int | None):
        self.profile = profile
        self.mode = mode
        self.seed = seed if mode == "sim" else None
        self.backend = backend
        self.twin: Twin | None = backend.twin
        e = profile.energy
        self.families: dict[str, MagnetFamily] = {
            name: MagnetFamily(backend, fam, e, name=f"{name}") for name, fam in profile.families.items()
        }
        good = np.ones(len(profile.bpm_refpts), dtype=bool)
        good[list(profile.bpm_bad)] = False
        self.bpm = Orbit(backend, profile.bpm_refpts, profile.bpm_names, good, name="bpm")
        rf = profile.spec.rf
        self.rf = RfCavity(backend, rf.frequency_limits, rf.voltage_limits, name="rf")
        self.tune = TuneMonitor(backend, name="tune")
        self.beam = BeamCurrent(backend, name="beam")
        by = lambda *t: {n: f for n, f in self.families.items() if f.type in t}  # noqa: E731
        self.quad = _FamilyDict("quadrupole", by("quadrupole"))
        self.sext = _FamilyDict("sextupole", by("sextupole"))
        self.hcors = _FamilyDict("hcor", by("hcor"))
        self.vcors = _FamilyDict("vcor", by("vcor"))
        self.hcor = next(iter(self.hcors.values()), None)
        self.vcor = next(iter(self.vcors.values()), None)

    def __repr__(self) -> str:
        return (f"Machine({self.profile.name!r}, mode={self.mode!r}, seed={self.seed}, bpms={len(self.bpm)}, "
                f"families={list(self.families)})")

    def devices(self) -> Iterator[Device]:
        """Every top-level device (for connecting, the queue server's device list, config snapshots)."""
        yield self.bpm
        yield from self.families.values()
        yield self.rf
        yield self.tune
        yield self.beam

    def family(self, name: str) -> MagnetFamily:
        try:
            return self.families[name]
        except KeyError:
            raise KeyError(f"unknown family {name!r}; valid families: {sorted(self.families)}") from None

    async def connect_async(self, timeout: float = 10.0) -> None:
        devs = list(self.devices())
        results = await asyncio.gather(*(d.connect(timeout=timeout) for d in devs), return_exceptions=True)
        errors = [(d.name, r) for d, r in zip(devs, results) if isinstance(r, BaseException)]
        if errors:
            lines = "\n".join(f"  {n}: {str(r)[:400]}" for n, r in errors[:5])
            raise ConnectionError(
                f"{len(errors)} device(s) of {self.profile.name!r} ({self.mode}) did not connect within {timeout} s:"
                f"\n{lines}\nIs the IOC running and reachable (EPICS_CA_ADDR_LIST)?")


def connect(profile: Profile | str, mode: Literal["sim", "epics"] = "sim", seed: int | None = None, *,
            twin: Twin | None = None, prefix: str | None = None, timeout: float = 10.0,
            error_scale: float | None = None) -> Machine:
    """Build and connect the device tree of ``profile``.

    Args:
        profile: a profile or its name/path.
        mode: ``"sim"`` (a twin in this process) or ``"epics"`` (live PVs from the profile's templates).
        seed: sim mode: error seed (``None`` = ideal machine, no noise).
        twin: sim mode: use this twin instead of making one.
        prefix: epics mode: override the profile's PV prefix.
        timeout: connection timeout [s].
        error_scale: sim mode: multiplier on the profile's alignment errors.
    """
    prof = load_profile(profile)
    if mode == "sim":
        twin = twin or Twin(prof, seed=seed, error_scale=error_scale)
        backend = SimBackend(twin)
        seed = twin.seed
    elif mode == "epics":
        backend = EpicsBackend(prof, prefix=prefix, timeout=timeout)
    else:
        raise ValueError(f"mode must be 'sim' or 'epics', got {mode!r}")
    m = Machine(prof, mode, backend, seed)
    bluesky_loop()
    call_in_bluesky_event_loop(m.connect_async(timeout=timeout))
    return m


