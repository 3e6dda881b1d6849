"""BPM statistics from repeated orbit readings (MML's ``monbpm``): each BPM's mean, its noise, and the faulty ones.

From ``k`` readings of the orbit (nothing moved in between) every BPM gets its mean and its standard deviation per
plane (the reading noise, with whatever beam motion the BPMs all see). The noise floor of a plane is the median
standard deviation of the in-service BPMs that read; a BPM is

- **dead** when one of its readings is not a number (no signal, a failed electronics channel);
- **frozen** when it read exactly the same value every time while the plane's floor is above zero (a stalled
  acquisition: an IOC or a BPM processor that stopped updating);
- **noisy** when its standard deviation is above ``noisy_factor`` times the floor in either plane.

These are the BPMs to mark out of service (profile ``bpm.status.bad``) before the orbit tools use them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from ._common import FloatArray, run_results, tool_run_start

__all__ = ["NOISY_FACTOR", "BpmStatistics", "bpm_statistics", "check_noisy_factor"]

#: a BPM whose standard deviation exceeds this many times its plane's noise floor is flagged noisy
NOISY_FACTOR = 5.0

_PLANES = ("x", "y")


def check_noisy_factor(noisy_factor: Any) -> float:
    """``noisy_factor`` as a float, or a ValueError saying it must be a number > 1 (times the noise floor)."""
    factor = float(noisy_factor)
    if not (np.isfinite(factor) and factor > 1):
        raise ValueError(f"noisy_factor must be a number > 1 (times the noise floor), got {noisy_factor!r}")
    return factor


def _flag_names(names: Sequence[str], mask: npt.ArrayLike) -> list[str]:
    return [names[i] for i in np.nonzero(np.asarray(mask, dtype=bool))[0]]


@dataclass(eq=False)
class BpmStatistics:
    """What repeated readings say of every BPM (``monitor_bpms``; :func:`bpm_statistics`).

    Attributes:
        bpm_names: BPM names, in the order of the arrays.
        mean: (n, 2) mean reading (x, y) [m] of the finite readings.
        std: (n, 2) standard deviation of the readings (x, y) [m] (sample, ``ddof=1``).
        noise: (2,) the noise floor per plane [m]: median ``std`` of the in-service BPMs that read.
        dead, frozen, noisy: (n,) flags (module docstring).
        in_service: (n,) the profile's in-service mask when measured (all True if not given).
        n_readings: readings taken.
        noisy_factor: the threshold of ``noisy`` in units of the floor.
        s: (n,) BPM positions [m], if known.
        uid: the run it was read from, if any.
    """

    bpm_names: list[str]
    mean: FloatArray
    std: FloatArray
    noise: FloatArray
    dead: npt.NDArray[np.bool_]
    frozen: npt.NDArray[np.bool_]
    noisy: npt.NDArray[np.bool_]
    in_service: npt.NDArray[np.bool_]
    n_readings: int
    noisy_factor: float = NOISY_FACTOR
    s: FloatArray | None = None
    uid: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    UNITS: ClassVar[dict[str, str]] = {
        "mean_x": "m", "mean_y": "m", "std_x": "m", "std_y": "m", "noise_x": "m", "noise_y": "m",
        "dead": "", "frozen": "", "noisy": "", "in_service": "", "n_readings": "", "noisy_factor": ""}
    DESCRIPTIONS: ClassVar[dict[str, str]] = {
        "mean_x": "mean horizontal reading per BPM", "mean_y": "mean vertical reading per BPM",
        "std_x": "standard deviation of the horizontal readings per BPM (ddof=1)",
        "std_y": "standard deviation of the vertical readings per BPM (ddof=1)",
        "noise_x": "horizontal noise floor: median std_x of the in-service BPMs that read",
        "noise_y": "vertical noise floor: median std_y of the in-service BPMs that read",
        "dead": "1 if a reading of the BPM was not a number",
        "frozen": "1 if the BPM read exactly the same value every time (the floor being above zero)",
        "noisy": "1 if std_x or std_y is above noisy_factor x the plane's floor",
        "in_service": "1 if the BPM was in service in the profile (bpm.status)",
        "n_readings": "orbit readings taken", "noisy_factor": "threshold of 'noisy' in units of the noise floor"}

    def __post_init__(self) -> None:
        n = len(self.bpm_names)
        self.mean = np.asarray(self.mean, dtype=float).reshape(n, 2)
        self.std = np.asarray(self.std, dtype=float).reshape(n, 2)
        self.noise = np.asarray(self.noise, dtype=float).reshape(2)
        for k in ("dead", "frozen", "noisy", "in_service"):
            setattr(self, k, np.asarray(getattr(self, k), dtype=bool).reshape(n))
        if self.s is not None:
            self.s = np.asarray(self.s, dtype=float).reshape(n)

    @property
    def suspect(self) -> list[str]:
        """In-service BPMs flagged dead, frozen or noisy: the ones to check or take out of service."""
        return _flag_names(self.bpm_names, (self.dead | self.frozen | self.noisy) & self.in_service)

    def flags(self) -> dict[str, list[str]]:
        """``{"dead": [...], "frozen": [...], "noisy": [...]}``: the names of the in-service BPMs of each kind."""
        return {k: _flag_names(self.bpm_names, getattr(self, k) & self.in_service) for k in ("dead", "frozen", "noisy")}

    def summary(self) -> str:
        """One line: the floors and the flagged BPMs."""
        parts = [f"{self.n_readings} readings of {len(self.bpm_names)} BPMs; noise floor x {self.noise[0] * 1e6:.3g} um, "
                 f"y {self.noise[1] * 1e6:.3g} um"]
        for kind, names in self.flags().items():
            if names:
                parts.append(f"{kind}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''} ({len(names)})")
        if not self.suspect:
            parts.append("no dead, frozen or noisy BPM")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"BpmStatistics({self.summary()}{', uid=' + self.uid[:8] if self.uid else ''})"

    def to_results(self) -> dict[str, Any]:
        return {"mean_x": self.mean[:, 0], "mean_y": self.mean[:, 1], "std_x": self.std[:, 0],
                "std_y": self.std[:, 1], "noise_x": float(self.noise[0]), "noise_y": float(self.noise[1]),
                "dead": self.dead.astype(np.int64), "frozen": self.frozen.astype(np.int64),
                "noisy": self.noisy.astype(np.int64), "in_service": self.in_service.astype(np.int64),
                "n_readings": int(self.n_readings), "noisy_factor": float(self.noisy_factor)}

    @classmethod
    def from_results(cls, results: Mapping[str, Any], start: Mapping[str, Any] | None = None) -> BpmStatistics:
        start = start or {}
        missing = [k for k in ("mean_x", "mean_y", "std_x", "std_y") if k not in results]
        if missing:
            raise KeyError(f"no {missing} in these results (got {sorted(results)}): is it a 'bpm_statistics' run?")
        n = np.asarray(results["mean_x"]).size
        names = list(start.get("bpm_names") or [f"BPM_{i + 1:03d}" for i in range(n)])
        s = start.get("bpm_s")

        def flag(key: str, default: bool) -> np.ndarray:
            return np.asarray(results.get(key, np.full(n, default)), dtype=bool).reshape(n)

        return cls(bpm_names=names, mean=np.column_stack([results["mean_x"], results["mean_y"]]),
                   std=np.column_stack([results["std_x"], results["std_y"]]),
                   noise=np.array([float(np.asarray(results.get("noise_x", np.nan))),
                                   float(np.asarray(results.get("noise_y", np.nan)))]),
                   dead=flag("dead", False), frozen=flag("frozen", False), noisy=flag("noisy", False),
                   in_service=flag("in_service", True), n_readings=int(np.asarray(results.get("n_readings", 0))),
                   noisy_factor=float(np.asarray(results.get("noisy_factor", NOISY_FACTOR))),
                   s=None if s is None else np.asarray(s, dtype=float), uid=start.get("uid"),
                   metadata={k: start[k] for k in ("profile", "seed", "mode", "time") if k in start})

    @classmethod
    def from_run(cls, run: Any) -> BpmStatistics:
        """Read the statistics of a ``bpm_statistics`` run (``monitor_bpms``) back from the catalogue."""
        start = tool_run_start(run, "bpm_statistics", "'bpm_statistics' run (monitor_bpms)")
        return cls.from_results(run_results(run), start)

    def plot(self, path: str | Path) -> Path:
        """PNG of each BPM's noise (standard deviation) [um] along the ring per plane, the floor and the noisy
        threshold drawn, dead / frozen / noisy BPMs marked and named. Thread-safe: matplotlib's object API on an Agg
        canvas, no pyplot state."""
        from .plots import _canvas

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = _canvas(9, 5.5)
        axes = fig.subplots(2, 1, sharex=True)
        pos = np.arange(len(self.bpm_names), dtype=float) if self.s is None else self.s
        std_um = self.std * 1e6
        positive = std_um[np.isfinite(std_um) & (std_um > 0)]
        bottom = float(positive.min()) / 3 if positive.size else 1e-3  # frozen (0) and dead (NaN) BPMs sit here
        for k, (ax, plane) in enumerate(zip(axes, _PLANES)):
            shown = np.where(np.isfinite(std_um[:, k]) & (std_um[:, k] > 0), std_um[:, k], bottom)
            ax.semilogy(pos, shown, ".", ms=3, color="C0", label=f"std {plane}")
            floor = self.noise[k] * 1e6
            if np.isfinite(floor) and floor > 0:
                ax.axhline(floor, color="k", lw=0.8, label=f"floor {floor:.3g} um")
                ax.axhline(self.noisy_factor * floor, color="C1", lw=0.8, ls="--",
                           label=f"noisy above {self.noisy_factor:g} x floor")
            for kind, colour, marker in (("dead", "C3", "x"), ("frozen", "C4", "s"), ("noisy", "C1", "o")):
                mask = getattr(self, kind) & self.in_service
                if kind == "noisy":
                    mask = mask & (std_um[:, k] > self.noisy_factor * floor) if np.isfinite(floor) else mask
                idx = np.nonzero(mask)[0]
                if idx.size:
                    ax.plot(pos[idx], shown[idx], marker, ms=7, mfc="none", color=colour, label=f"{kind} ({idx.size})")
                    for i in idx[:5]:
                        ax.annotate(self.bpm_names[i], (pos[i], shown[i]), textcoords="offset points",
                                    xytext=(3, -10 if kind == "dead" else 4),
                                    fontsize=7, color=colour)
            ax.set_ylim(bottom / 1.5, None)
            ax.set_ylabel(f"std {plane} [um]")
            ax.grid(alpha=0.3, which="both")
            ax.legend(loc="upper right", fontsize=7, ncol=2)
        axes[1].set_xlabel("BPM index" if self.s is None else "s [m]")
        fig.suptitle(f"BPM noise from {self.n_readings} readings: {len(self.suspect)} suspect BPM(s) "
                     "(frozen and dead ones at the bottom)")
        fig.subplots_adjust(left=0.09, right=0.98, bottom=0.09, top=0.92, hspace=0.12)
        fig.savefig(path)
        return path


def bpm_statistics(x: npt.ArrayLike, y: npt.ArrayLike, bpm_names: Sequence[str], *,
                   in_service: npt.ArrayLike | None = None, noisy_factor: float = NOISY_FACTOR,
                   s: npt.ArrayLike | None = None) -> BpmStatistics:
    """Statistics of ``k`` orbit readings ``x``, ``y`` (each ``(k, n)`` [m], one row per reading).

    Args:
        x, y: the readings, one row per reading, one column per BPM.
        bpm_names: the n BPM names.
        in_service: (n,) in-service mask (default all): the floor is taken over these, and only these are flagged.
        noisy_factor: a BPM is noisy above this many times its plane's floor (> 1).
        s: (n,) BPM positions [m] for the figure.

    Raises:
        ValueError: fewer than 2 readings, shapes that do not match the names, or a threshold <= 1.
    """
    xs, ys = np.atleast_2d(np.asarray(x, dtype=float)), np.atleast_2d(np.asarray(y, dtype=float))
    n = len(bpm_names)
    if xs.shape != ys.shape or xs.shape[1] != n:
        raise ValueError(f"readings must be (k, {n}) in both planes for {n} BPMs, got {xs.shape} and {ys.shape}")
    k = xs.shape[0]
    if k < 2:
        raise ValueError(f"need at least 2 readings to measure a noise, got {k}")
    factor = check_noisy_factor(noisy_factor)
    good = np.ones(n, dtype=bool) if in_service is None else np.asarray(in_service, dtype=bool).reshape(n)
    readings = np.stack([xs, ys], axis=2)  # (k, n, 2)
    finite = np.isfinite(readings)
    dead = ~finite.all(axis=(0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        count = finite.sum(axis=0)
        total = np.where(finite, readings, 0.0).sum(axis=0)
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        dev = np.where(finite, readings - mean, 0.0)
        std = np.where(count > 1, np.sqrt((dev * dev).sum(axis=0) / np.maximum(count - 1, 1)), np.nan)
    same = ~dead & np.all(readings == readings[:1], axis=(0, 2))  # every reading identical, both planes
    std[same] = 0.0  # (not the rounding residue of the sums)
    noise = np.full(2, np.nan)
    for p in range(2):
        usable = good & ~dead & np.isfinite(std[:, p])
        if usable.any():
            noise[p] = float(np.median(std[usable, p]))
    with np.errstate(invalid="ignore"):
        frozen = same & bool(np.any(noise > 0))  # (a noise-free system cannot tell frozen from quiet)
    with np.errstate(invalid="ignore"):
        noisy = ~dead & np.any(std > factor * noise, axis=1) & np.all(np.isfinite(noise))
    return BpmStatistics(bpm_names=list(bpm_names), mean=mean, std=std, noise=noise, dead=dead,
                         frozen=frozen, noisy=noisy, in_service=good, n_readings=k,
                         noisy_factor=factor, s=None if s is None else np.asarray(s, dtype=float))
