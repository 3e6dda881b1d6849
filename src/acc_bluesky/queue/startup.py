"""Startup code of an RE Manager worker (or an IPython session) for one profile.

``profiles/<name>/startup.py`` calls :func:`build_namespace`, which builds, in this order,

1. ``RE``: :func:`acc_bluesky.data.make_run_engine` (TiledWriter, FAIR metadata validator). It comes first: the
   RunEngine starts the bluesky event loop that the ophyd-async devices connect on;
2. ``m``: the machine, :func:`acc_bluesky.machine.connect` (sim twin or EPICS);
3. the queue plans of :func:`queue_plans` and the top-level devices (``bpm``, ``rf``, ``tune``, ``beam`` and
   every magnet family by name);
4. the queue function :func:`sim_fault` (sim mode: faults of the twin for rehearsals).

Settings come from arguments, else from the environment that ``acc-bluesky queue start`` sets:
``ACC_BLUESKY_PROFILE``, ``ACC_BLUESKY_MODE`` (sim/epics), ``ACC_BLUESKY_SEED`` (int or ``none``),
``ACC_BLUESKY_PREFIX`` (epics: the PV prefix, default the profile's),
and the data layer's ``ACC_BLUESKY_CATALOG`` (an embedded catalogue folder or a Tiled server URI; API key from
``TILED_API_KEY``).

The tool plans take a :class:`~acc_bluesky.machine.Machine`, which a queue item cannot name. The queue plans are
thin wrappers that bind the machine and expose only JSON-friendly, typed parameters (numbers, strings, lists of
corrector/BPM/family names as enums), so the RE Manager validates a submission completely before it is queued.
Their docstrings are numpydoc (the format the queue server reads parameter descriptions from). Only the wrappers
are generator functions in the namespace: the tool modules are imported as modules, never their functions.
"""

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.utils import MsgGenerator
from bluesky_queueserver import parameter_annotation_decorator

from ..data import find_runs, make_run_engine
from ..machine import Machine, connect
from ..plans import config as _config
from ..plans import optics as _optics
from ..plans import orbit as _orbit
from .manager import ENV_MODE, ENV_PREFIX, ENV_PROFILE, ENV_SEED

__all__ = ["build_namespace", "queue_plans", "queue_functions", "settings_from_env", "RunLookup"]

#: Keywords accepted where a plan needs a previous run.
LATEST = "latest"
MODEL = "model"
MEASURE = "measure"


def settings_from_env(profile: str | os.PathLike | None = None, mode: str | None = None,
                      seed: Any = "env") -> dict[str, Any]:
    """Resolve profile, mode and seed: explicit arguments first, then the ``ACC_BLUESKY_*`` environment.

    ``seed="env"`` reads ``ACC_BLUESKY_SEED`` (default 1; ``none`` = ideal machine).
    """
    profile = profile or os.environ.get(ENV_PROFILE) or "ebs"
    mode = mode or os.environ.get(ENV_MODE) or "sim"
    if mode not in ("sim", "epics"):
        raise ValueError(f"{ENV_MODE} must be 'sim' or 'epics', got {mode!r}")
    if seed == "env":
        text = os.environ.get(ENV_SEED, "1").strip().lower()
        if text in ("", "none", "null", "ideal"):
            seed = None
        else:
            try:
                seed = int(text)
            except ValueError:
                raise ValueError(f"{ENV_SEED} must be an integer or 'none', got {text!r}") from None
    return {"profile": profile, "mode": mode, "seed": seed, "prefix": os.environ.get(ENV_PREFIX) or None}


class RunLookup:
    """Resolves ``"latest"``, a configuration name or a run uid to a run uid of the catalogue the RE writes to.

    ``latest`` means the newest run of the given tool recorded on the same profile and mode (and seed, in sim
    mode): an ORM of another machine is never picked up by accident.
    """

    def __init__(self, machine: Machine, catalog: Callable[[], Any]):
        self.machine = machine
        self._catalog = catalog

    def catalog(self):
        return self._catalog()

    def _match(self) -> dict[str, Any]:
        m = self.machine
        match: dict[str, Any] = {"profile": m.profile.name, "mode": m.mode}
        if m.mode == "sim":
            match["seed"] = m.seed
        return match

    def latest(self, tool: str, **extra: Any) -> str:
        """uid of the newest successful run of ``tool`` on this machine (``extra``: more start-document matches).

        Failed or aborted runs (stop document ``exit_status`` other than ``success``) are skipped.
        """
        match = self._match() | extra
        runs = find_runs(self.catalog(), tool=tool, **match)
        for uid in reversed(list(runs)):  # the catalogue keeps runs in the order they were written
            if (runs[uid].metadata.get("stop") or {}).get("exit_status") == "success":
                return runs[uid].metadata["start"]["uid"]
        where = ", ".join(f"{k}={v!r}" for k, v in match.items())
        raise LookupError(f"no successful {tool!r} run in the catalogue for {where}: run the measurement "
                          f"first (e.g. queue it before this plan) or pass a run uid")

    def resolve(self, value: str, tool: str, *, by_name: str | None = None) -> str:
        """``"latest"`` -> newest ``tool`` run; ``by_name``: a name searched in that start-document key; else the
        uid itself (checked to exist)."""
        if value == LATEST:
            return self.latest(tool)
        if by_name is not None and not _looks_like_uid(value):
            return self.latest(tool, **{by_name: value})
        cat = self.catalog()
        try:
            run = cat[value]
        except KeyError:
            raise LookupError(f"no run {value!r} in the catalogue; give a run uid, {LATEST!r}"
                              + (f" or a {by_name}" if by_name else "")) from None
        got = run.metadata["start"].get("tool")
        if got != tool:
            raise LookupError(f"run {value} is a {got!r} run, expected a {tool!r} run")
        return run.metadata["start"]["uid"]


_UID = re.compile(r"^[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}$")


def _looks_like_uid(text: str) -> bool:
    return bool(_UID.match(text))


def _span(machine: Machine, families: list[str]) -> float | None:
    """Largest setpoint span (high - low) [A] of ``families`` (a bound for steps), None when unlimited."""
    spans = [f.limits.high - f.limits.low for n, f in machine.families.items() if n in families]
    spans = [s for s in spans if s == s and s != float("inf")]
    return max(spans) if spans else None


def _half_span(span: float | None) -> dict[str, float]:
    """A symmetric range of +-span/2 (a step larger than half the setpoint span leaves it from mid-range), or none."""
    return _rng(-span / 2, span / 2) if span else {}


def _rng(lo: float | None = None, hi: float | None = None) -> dict[str, float]:
    out = {}
    if lo is not None:
        out["min"] = float(lo)
    if hi is not None:
        out["max"] = float(hi)
    return out


def queue_plans(m: Machine, lookup: RunLookup) -> dict[str, Callable[..., MsgGenerator[str]]]:
    """The queue-facing plans bound to machine ``m``: name -> generator function.

    Every plan returns the uid of its run and restores what it changed when it fails or is aborted.
    """
    cors = [n for fam in (*m.hcors.values(), *m.vcors.values()) for n in fam.names]
    cor_fams = [*m.hcors, *m.vcors]
    bpms = list(m.bpm.names)
    quads, sexts = list(m.quad), list(m.sext)
    cspan = _span(m, cor_fams)
    qspan, sspan = _span(m, quads), _span(m, sexts)
    rf_lim = m.rf.frequency_limits
    rf_half = (rf_lim.high - rf_lim.low) / 2 if np.isfinite(rf_lim.high - rf_lim.low) else None
    pair = "typing.Tuple[float, float]"  # exactly two values: (x, y)
    cor_enum = {"Correctors": [*cor_fams, *cors]}
    bpm_enum = {"BPMs": bpms}
    readable = {d.name: d for d in (m.bpm, m.tune, m.beam, m.rf)}

    def opt(t: str) -> str:
        return f"typing.Optional[{t}]"

    # ------------------------------------------------------------------------------------------------- count
    @parameter_annotation_decorator({
        "parameters": {
            "detectors": {"annotation": "typing.List[Readables]", "devices": {"Readables": list(readable)},
                          "default": ["bpm"]},
            "num": _rng(1),
            "delay": _rng(0),
        }})
    def count(detectors: list = ["bpm"], num: int = 1, delay: float = 0.0,  # noqa: B006 - queue default
              md: dict | None = None) -> MsgGenerator[str]:
        """Read detectors num times (one event each) and record the readings with FAIR metadata.

        Parameters
        ----------
        detectors
            devices to read: bpm (orbit x, y [m]), tune (fractional tunes), beam (current [A], lifetime [s]),
            rf (frequency [Hz], voltage [V]).
        num
            number of readings.
        delay
            time between readings [s].
        md
            metadata merged into the start document.
        """
        import bluesky.plans as bp

        from ..data.metadata import tool_metadata

        dets = [readable[d] if isinstance(d, str) else d for d in detectors]
        _md = tool_metadata("count", m, plan_name="count", detectors=[d.name for d in dets], num=num,
                            delay=delay) | {"num_points": int(num)} | (md or {})
        return (yield from bp.count(dets, num=int(num), delay=float(delay), md=_md))

    # ------------------------------------------------------------------------------------------------- orbit
    @parameter_annotation_decorator({
        "parameters": {
            "correctors": {"annotation": opt("typing.List[Correctors]"), "enums": cor_enum},
            "delta": _half_span(cspan), "delta_physics": _rng(-0.01, 0.01),
            "n_avg": _rng(1), "settle": _rng(0), "df": _rng(0, rf_half),
        }})
    def measure_orm(correctors: list[str] | None = None, delta: float | None = None,
                    delta_physics: float | None = None, bipolar: bool = True, n_avg: int = 1, settle: float = 0.0,
                    rf: bool = False, df: float | None = None, md: dict | None = None) -> MsgGenerator[str]:
        """Measure the orbit response matrix (both planes at every BPM) to the chosen correctors.

        Each corrector is stepped by +delta (and -delta), the orbit read, the corrector put back. The machine is
        left exactly as found, also when the plan fails or is aborted.

        Parameters
        ----------
        correctors
            corrector names (HST:001 ...) or family names (HST, VST); default every in-service corrector.
        delta
            corrector half step [A]; default the profile's tools.orbit_response.delta.
        delta_physics
            half step as a kick [rad] instead of delta.
        bipolar
            step +delta and -delta (second-order errors cancel) or +delta against a reference orbit.
        n_avg
            orbit acquisitions averaged per step.
        settle
            wait after each corrector move [s].
        rf
            also measure the response to the RF frequency [m/Hz].
        df
            RF half step [Hz] (with rf).
        md
            metadata merged into the start document.
        """
        return (yield from _orbit.measure_orm(m, correctors=correctors, delta=delta, delta_physics=delta_physics,
                                              bipolar=bipolar, n_avg=n_avg, settle=settle, rf=rf, df=df, md=md))

    @parameter_annotation_decorator({
        "parameters": {
            "exclude_bpms": {"annotation": opt("typing.List[BPMs]"), "enums": bpm_enum},
            "exclude_correctors": {"annotation": opt("typing.List[Correctors]"), "enums": cor_enum},
            "n_sv": _rng(1), "tikhonov": _rng(0), "bpm_weights": _rng(0), "corrector_weights": _rng(0),
            "gain": _rng(0, 1), "max_step": _rng(0), "max_iter": _rng(1), "tol": _rng(0), "n_avg": _rng(1),
            "min_improvement": _rng(0, 0.99),
        }})
    def correct_orbit(orm: str = LATEST, n_sv: int | None = None, tikhonov: float | None = None,
                      bpm_weights: list[float] | None = None, corrector_weights: list[float] | None = None,
                      exclude_bpms: list[str] | None = None, exclude_correctors: list[str] | None = None,
                      fit_rf: bool = False, gain: float = 1.0, max_step: float | None = None, max_iter: int = 3,
                      tol: float | None = None, target: str | None = None, n_avg: int = 1,
                      min_improvement: float = 0.02, md: dict | None = None) -> MsgGenerator[str]:
        """Correct the closed orbit by SVD with a measured or model orbit response matrix (MML setorbit).

        Kept when it completes; on failure or abort every corrector (and the RF) is put back.

        Parameters
        ----------
        orm
            'latest' (newest orbit_response run of this machine in the catalogue), a measure_orm run uid,
            'model' (design lattice) or 'measure' (measure it now, its own run).
        n_sv
            number of singular values (default: above 1e-3 of the largest).
        tikhonov
            Tikhonov regularisation instead of a singular-value cut.
        bpm_weights
            weight per BPM (or per reading); 0 excludes.
        corrector_weights
            weight per corrector of the ORM; 0 excludes.
        exclude_bpms
            BPM names left out.
        exclude_correctors
            corrector names never moved.
        fit_rf
            also correct with the RF frequency [Hz].
        gain
            fraction of the correction applied per iteration, in (0, 1].
        max_step
            largest corrector move per iteration [A].
        max_iter
            iterations at most.
        tol
            stop when the rms orbit error of both planes is below this [m].
        target
            golden orbit: uid of a save_config run, or the name it was saved under ('golden').
        n_avg
            orbit acquisitions averaged per reading.
        min_improvement
            stop when an iteration reduced the rms by less than this fraction (times gain): converged.
        md
            metadata merged into the start document.
        """
        if orm == MEASURE:
            resp = None
        elif orm == MODEL:
            resp = MODEL
        else:
            resp = lookup.resolve(orm, "orbit_response")
        tgt = None if target is None else lookup.resolve(target, "config", by_name="config_name")
        return (yield from _orbit.correct_orbit(
            m, orm=resp, n_sv=n_sv, tikhonov=tikhonov, bpm_weights=bpm_weights, corrector_weights=corrector_weights,
            exclude_bpms=list(exclude_bpms or ()), exclude_correctors=list(exclude_correctors or ()), fit_rf=fit_rf,
            gain=gain, max_step=max_step, max_iter=max_iter, tol=tol, target=tgt, n_avg=n_avg,
            min_improvement=min_improvement, md=md))

    @parameter_annotation_decorator({
        "parameters": {
            "bpm": {"annotation": "BPMs", "enums": bpm_enum},
            "plane": {"annotation": "Planes", "enums": {"Planes": ["x", "y"]}},
            "n_correctors": _rng(3, 4),
            "correctors": {"annotation": opt("typing.List[Correctors]"), "enums": cor_enum},
            "exclude_correctors": {"annotation": opt("typing.List[Correctors]"), "enums": cor_enum},
            "amplitude": _rng(-0.01, 0.01), "angle": _rng(-0.01, 0.01), "max_iter": _rng(0), "tol": _rng(0),
            "n_avg": _rng(1),
        }})
    def orbit_bump(bpm: str, amplitude: float, plane: str = "x", angle: float | None = None,
                   n_correctors: int = 3, orm: str = MODEL, rf: bool | None = None,
                   correctors: list[str] | None = None, exclude_correctors: list[str] | None = None,
                   couple: bool = True, max_iter: int = 4, tol: float = 0.3e-6, n_avg: int = 1,
                   md: dict | None = None) -> MsgGenerator[str]:
        """A closed local orbit bump at one BPM (MML setorbitbump), refined from measured orbits.

        Kept when it completes; on failure or abort the correctors and the RF are put back.

        Parameters
        ----------
        bpm
            BPM name where the bump peaks.
        amplitude
            orbit change at the BPM [m] (at most 10 mm).
        plane
            'x' or 'y'.
        angle
            angle change at the BPM [rad] (needs 4 correctors).
        n_correctors
            3 (position) or 4 (position and angle).
        orm
            'model' (design lattice, default), 'latest' (newest measured ORM) or a measure_orm run uid.
        rf
            use the RF frequency as an extra variable (default: when needed).
        correctors
            force these corrector names, else the nearest usable ones are chosen.
        exclude_correctors
            never use these correctors.
        couple
            also use the other plane's correctors at the bump to cancel the x-y coupling leakage.
        max_iter
            measured refinements at most.
        tol
            closure goal: rms orbit change outside the bump [m].
        n_avg
            orbit acquisitions averaged.
        md
            metadata merged into the start document.
        """
        resp = None if orm == MODEL else lookup.resolve(orm, "orbit_response")
        return (yield from _orbit.orbit_bump(
            m, bpm, amplitude, angle=angle, plane=plane, n_correctors=n_correctors, orm=resp, rf=rf,
            correctors=correctors, exclude_correctors=list(exclude_correctors or ()), couple=couple,
            max_iter=max_iter, tol=tol, n_avg=n_avg, md=md))

    @parameter_annotation_decorator({"parameters": {"df": _rng(0, rf_half), "n_steps": _rng(1, 10), "n_avg": _rng(1),
                                                    "settle": _rng(0)}})
    def measure_dispersion(df: float | None = None, n_steps: int = 1, n_avg: int = 1, settle: float = 0.0,
                           md: dict | None = None) -> MsgGenerator[str]:
        """Measure the dispersion at every BPM from symmetric RF frequency steps (MML measdisp).

        The RF frequency is put back at the end, also on failure or abort.

        Parameters
        ----------
        df
            RF step [Hz]; default the profile's tools.dispersion.df.
        n_steps
            steps on each side of the present frequency.
        n_avg
            orbit acquisitions averaged per step.
        settle
            wait after each RF move [s].
        md
            metadata merged into the start document.
        """
        return (yield from _orbit.measure_dispersion(m, df=df, n_steps=n_steps, n_avg=n_avg, settle=settle, md=md))

    # ------------------------------------------------------------------------------------------- configurations
    def save_config(name: str = "", md: dict | None = None) -> MsgGenerator[str]:
        """Save every setpoint (magnet families [A], RF frequency [Hz] and voltage [V]) and the orbit as a run.

        Nothing moves.

        Parameters
        ----------
        name
            label of the configuration ('golden', 'injection', ...), usable by restore_config and correct_orbit.
        md
            metadata merged into the start document.
        """
        return (yield from _config.save_config(m, name=name, md=md))

    def restore_config(config: str = LATEST, md: dict | None = None) -> MsgGenerator[str]:
        """Put back a configuration saved by save_config (validated first: nothing moves on a bad one).

        Kept when it completes; on failure or abort the machine is put back as it was before.

        Parameters
        ----------
        config
            uid of a save_config run, the name it was saved under ('golden'), or 'latest'.
        md
            metadata merged into the start document.
        """
        uid = lookup.resolve(config, "config", by_name="config_name")
        return (yield from _config.restore_config(m, uid, md=md))

    # ------------------------------------------------------------------------------------------------- optics
    quad_enum = {"QuadFamilies": quads}
    sext_enum = {"SextFamilies": sexts}

    def _response(value: str, tool: str) -> Any:
        if value == MEASURE:
            return None
        if value == MODEL:
            return MODEL
        return lookup.resolve(value, tool)

    @parameter_annotation_decorator({"parameters": {"n_avg": _rng(1)}})
    def measure_tune(n_avg: int = 1, md: dict | None = None) -> MsgGenerator[str]:
        """Read the fractional tunes from the tune monitor.

        Parameters
        ----------
        n_avg
            readings averaged.
        md
            metadata merged into the start document.
        """
        return (yield from _optics.measure_tune(m, n_avg=n_avg, md=md))

    @parameter_annotation_decorator({
        "parameters": {
            "families": {"annotation": opt("typing.List[QuadFamilies]"), "enums": quad_enum},
            "delta": _half_span(qspan), "n_avg": _rng(1),
        }})
    def measure_tune_response(families: list[str] | None = None, delta: float | None = None, bipolar: bool = True,
                              n_avg: int = 1, md: dict | None = None) -> MsgGenerator[str]:
        """Measure the tune response dQ/dI of quadrupole families (MML meastuneresp); families put back.

        Parameters
        ----------
        families
            quadrupole families (default: all).
        delta
            half step [A] for every family; default sized for a tune change of about 2e-3.
        bipolar
            step both ways (central difference).
        n_avg
            tune readings averaged per point.
        md
            metadata merged into the start document.
        """
        return (yield from _optics.measure_tune_response(m, families=families, delta=delta, bipolar=bipolar,
                                                         n_avg=n_avg, md=md))

    @parameter_annotation_decorator({
        "parameters": {
            "target": {"annotation": pair, "min": 0.0, "max": 1.0},
            "families": {"annotation": opt("typing.List[QuadFamilies]"), "enums": quad_enum},
            "max_iter": _rng(1), "tol": _rng(0), "n_avg": _rng(1),
        }})
    def correct_tune(target: tuple[float, float], families: list[str] | None = None, response: str = MEASURE,
                     max_iter: int = 3, tol: float = 1e-4, n_avg: int = 1,
                     md: dict | None = None) -> MsgGenerator[str]:
        """Move the fractional tunes to target with quadrupole families (MML settune).

        Kept when it completes; on failure or abort the families are put back.

        Parameters
        ----------
        target
            fractional tunes [qx, qy], each in (0, 1).
        families
            quadrupole families to use (default: the best-conditioned pair).
        response
            'measure' (measure it now, its own run), 'model', 'latest' (newest tune_response run) or a run uid.
        max_iter
            corrections at most.
        tol
            convergence threshold per plane [tune units].
        n_avg
            tune readings averaged.
        md
            metadata merged into the start document.
        """
        return (yield from _optics.correct_tune(m, target=target, families=families,
                                                response=_response(response, "tune_response"), max_iter=max_iter,
                                                tol=tol, n_avg=n_avg, md=md))

    @parameter_annotation_decorator({
        "parameters": {"dp_max": _rng(0, 0.05), "steps": _rng(3, 51), "order": _rng(1, 3), "n_avg": _rng(1),
                       "settle": _rng(0)}})
    def measure_chromaticity(dp_max: float | None = None, steps: int | None = None, order: int | None = None,
                             n_avg: int = 1, settle: float = 0.0, md: dict | None = None) -> MsgGenerator[str]:
        """Measure the chromaticity by an RF frequency scan (MML measchro); the RF is put back.

        Parameters
        ----------
        dp_max
            largest momentum deviation of the scan (default: profile tools.chromaticity.dp_max).
        steps
            scan points, odd >= 3 (default: profile).
        order
            polynomial order of the fit, 1 to 3 (default: profile, else 2).
        n_avg
            tune readings per point.
        settle
            wait after each RF step [s].
        md
            metadata merged into the start document.
        """
        return (yield from _optics.measure_chromaticity(m, dp_max=dp_max, steps=steps, order=order, n_avg=n_avg,
                                                        settle=settle, figure_dir=None, md=md))

    @parameter_annotation_decorator({
        "parameters": {
            "families": {"annotation": opt("typing.List[SextFamilies]"), "enums": sext_enum},
            "delta": _half_span(sspan), "dp_max": _rng(0, 0.05), "steps": _rng(3, 51), "order": _rng(1, 3),
            "n_avg": _rng(1),
        }})
    def measure_chromaticity_response(families: list[str] | None = None, delta: float | None = None,
                                      bipolar: bool = True, dp_max: float | None = None, steps: int | None = None,
                                      order: int | None = None, n_avg: int = 1,
                                      md: dict | None = None) -> MsgGenerator[str]:
        """Measure the chromaticity response dxi/dI of sextupole families (MML measchroresp); all put back.

        Parameters
        ----------
        families
            sextupole families (default: all).
        delta
            half step [A] for every family; default sized for a chromaticity change of about 1.
        bipolar
            step both ways.
        dp_max
            largest momentum deviation of each RF scan.
        steps
            points per RF scan.
        order
            polynomial order of the fits.
        n_avg
            tune readings per point.
        md
            metadata merged into the start document.
        """
        return (yield from _optics.measure_chromaticity_response(
            m, families=families, delta=delta, bipolar=bipolar, dp_max=dp_max, steps=steps, order=order,
            n_avg=n_avg, md=md))

    @parameter_annotation_decorator({
        "parameters": {
            "target": {"annotation": pair, "min": -100.0, "max": 100.0},
            "families": {"annotation": opt("typing.List[SextFamilies]"), "enums": sext_enum},
            "max_iter": _rng(1), "tol": _rng(0), "dp_max": _rng(0, 0.05), "steps": _rng(3, 51), "order": _rng(1, 3),
            "n_avg": _rng(1),
        }})
    def correct_chromaticity(target: tuple[float, float], families: list[str] | None = None, response: str = MODEL,
                             max_iter: int = 3, tol: float = 0.1, dp_max: float | None = None,
                             steps: int | None = None, order: int | None = None, n_avg: int = 1,
                             md: dict | None = None) -> MsgGenerator[str]:
        """Move the chromaticities to target with sextupole families (MML setchro).

        Kept when it completes; on failure or abort the families and the RF are put back.

        Parameters
        ----------
        target
            chromaticities [xi_x, xi_y] = dQ/d(dp/p).
        families
            sextupole families to use (default: the best-conditioned pair).
        response
            'model' (default), 'measure' (its own run), 'latest' (newest chromaticity_response run) or a uid.
        max_iter
            corrections at most.
        tol
            convergence threshold per plane.
        dp_max
            largest momentum deviation of the RF scans.
        steps
            points per RF scan.
        order
            polynomial order of the fits.
        n_avg
            tune readings per point.
        md
            metadata merged into the start document.
        """
        return (yield from _optics.correct_chromaticity(
            m, target=target, families=families, response=_response(response, "chromaticity_response"),
            max_iter=max_iter, tol=tol, dp_max=dp_max, steps=steps, order=order, n_avg=n_avg, md=md))

    plans = [count, measure_orm, correct_orbit, orbit_bump, measure_dispersion, save_config, restore_config,
             measure_tune, measure_tune_response, correct_tune, measure_chromaticity, measure_chromaticity_response,
             correct_chromaticity]
    return {p.__name__: p for p in plans}


def queue_functions(m: Machine) -> dict[str, Callable[..., Any]]:
    """Functions the queue may execute (``api.function_execute``): :func:`sim_fault` in sim mode."""
    kinds = ("lose_beam", "inject", "dead_bpm", "stuck", "dead", "trip", "clear")

    def sim_fault(kind: str, family: str | None = None, index: int | None = None, on: bool = True) -> dict:
        """Switch a fault of the simulated machine (sim mode only), e.g. to rehearse how plans recover.

        kind: 'lose_beam' (until 'inject'), 'inject', 'dead_bpm' (index), 'stuck'/'dead' (family, index),
        'trip' (family), 'clear' (every fault). ``on=False`` switches a fault off. Returns the active faults.
        """
        if m.twin is None:
            raise RuntimeError(f"sim_fault needs the simulated machine; this worker runs in {m.mode!r} mode")
        if kind not in kinds:
            raise ValueError(f"unknown fault {kind!r}; kinds: {', '.join(kinds)}")
        an = m.twin.anomalies
        if kind == "lose_beam":
            an.lose_beam()
        elif kind == "inject":
            m.twin.inject()
        elif kind == "clear":
            an.clear()
        elif kind == "dead_bpm":
            if index is None:
                raise ValueError("dead_bpm needs index (BPM index, 0-based)")
            an.dead_bpm(int(index), on)
        elif kind == "trip":
            if family is None:
                raise ValueError("trip needs family")
            an.trip(family, on)
        else:
            if family is None or index is None:
                raise ValueError(f"{kind} needs family and index (0-based)")
            getattr(an, kind)(family, int(index), on)
        active = an.active()
        return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, list) else v
                for k, v in active.items()}

    return {"sim_fault": sim_fault}


def build_namespace(profile: str | os.PathLike | None = None, *, mode: str | None = None, seed: Any = "env",
                    catalog_dir: str | os.PathLike | None = None, tiled: str | None = None,
                    progress: bool | None = None) -> dict[str, Any]:
    """Build ``RE`` (first), the machine ``m``, its devices, the queue plans and functions.

    Args:
        profile: profile name or path (default ``$ACC_BLUESKY_PROFILE``, else ``ebs``).
        mode: ``"sim"`` or ``"epics"`` (default ``$ACC_BLUESKY_MODE``, else sim).
        seed: sim error seed; ``"env"`` reads ``$ACC_BLUESKY_SEED`` (default 1, ``none`` = ideal).
        catalog_dir: embedded Tiled catalogue folder; with ``tiled``, both default to ``$ACC_BLUESKY_CATALOG``
            (a folder or a URI), else the data layer's default folder.
        tiled: Tiled server URI instead (API key from ``$TILED_API_KEY``).
        progress: progress bars; default: off in a queue worker (its output goes to a log), on in IPython.

    Returns:
        The namespace: ``RE``, ``m``, the devices by name, the queue plans and functions (``RE.catalog`` is the
        Tiled client the runs go to).
    """
    s = settings_from_env(profile, mode, seed)
    if progress is None:
        from bluesky_queueserver import is_re_worker_active

        progress = not is_re_worker_active()
    RE = make_run_engine(tiled=tiled, catalog_dir=catalog_dir, progress=progress)  # noqa: N806 - bluesky's name
    RE.wait_written = True  # a queue client reads the runs of an item as soon as the queue says it completed
    m = connect(s["profile"], mode=s["mode"], seed=s["seed"], prefix=s["prefix"])

    def catalog():
        if RE.catalog is None:
            raise LookupError("the Tiled catalogue is not reachable (runs go to the backup folder "
                              f"{RE.backup_dir}); pass a run uid the plan can use without it")
        return RE.catalog

    lookup = RunLookup(m, catalog)
    ns: dict[str, Any] = {"RE": RE, "m": m}
    for dev in m.devices():
        ns[dev.name] = dev
    ns.update(queue_plans(m, lookup))
    if m.mode == "sim":
        ns.update(queue_functions(m))
    ns.update(_ipython_extras(RE))
    return ns


def _ipython_extras(RE: Any) -> dict[str, Any]:  # noqa: N803 - bluesky's name
    """In an IPython session (``%run -i startup.py``, or the file as an IPython startup file): the catalogue
    ``cat``, the tool plans ``ap`` (``ap.measure_orm(m)``; the bare names are the queue's machine-bound wrappers),
    bluesky's ``bp``/``bps`` and a subscribed BestEffortCallback ``bec`` (live tables; plots with a display).
    Nothing in a queue worker or when the queue server lists the plans."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return {}
    if get_ipython() is None:
        return {}
    import importlib

    import bluesky.plan_stubs as bps
    import bluesky.plans as bp
    from bluesky.callbacks.best_effort import BestEffortCallback

    bec = BestEffortCallback()
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        bec.disable_plots()
    RE.subscribe(bec)
    return {"cat": RE.catalog, "bec": bec, "ap": importlib.import_module("acc_bluesky.plans"), "bp": bp, "bps": bps}


def profile_from_startup_file(file: str | None, default: str) -> str:
    """The profile of a ``profiles/<name>/startup.py``: its folder's ``profile.yaml`` when the file is known."""
    if file:
        p = Path(file).resolve().parent / "profile.yaml"
        if p.is_file():
            return str(p)
    return default
