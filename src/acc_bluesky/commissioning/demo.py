"""The virtual commissioning demo: ``acc-bluesky demo``.

Twin with errors -> save config -> ORM -> orbit correction -> dispersion -> tune and chromaticity correction, every
step a Bluesky plan recorded in the (embedded) Tiled catalogue; a summary table with the truth the twin knows,
the run uids, and PNG figures.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis._common import rms

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What the demo did: truth before/after, run uids by step, figure paths, timings."""

    profile: str
    seed: int
    before: dict[str, Any]
    after: dict[str, Any]
    uids: dict[str, str] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    catalog: str = ""

    def table(self) -> str:
        b, a = self.before, self.after

        def num(v: float, fmt: str, unit: str = "") -> str:
            return "no closed orbit" if not np.isfinite(v) else f"{v:{fmt}}{unit}"

        rows = [
            ("rms orbit x (truth)", num(b["orbit_x_rms"] * 1e6, "9.1f", " um"), num(a["orbit_x_rms"] * 1e6, "9.1f", " um")),
            ("rms orbit y (truth)", num(b["orbit_y_rms"] * 1e6, "9.1f", " um"), num(a["orbit_y_rms"] * 1e6, "9.1f", " um")),
            ("tune x", num(b["tunes"][0], "12.4f"), num(a["tunes"][0], "12.4f")),
            ("tune y", num(b["tunes"][1], "12.4f"), num(a["tunes"][1], "12.4f")),
            ("chromaticity x", num(b["chrom"][0], "12.2f"), num(a["chrom"][0], "12.2f")),
            ("chromaticity y", num(b["chrom"][1], "12.2f"), num(a["chrom"][1], "12.2f")),
        ]
        w = max(len(r[0]) for r in rows)
        lines = [f"{'':{w}s}  {'before':>15s}  {'after':>15s}   (targets: tunes {self.after['tune_target']}, "
                 f"chromaticity {self.after['chrom_target']})"]
        lines += [f"{r[0]:{w}s}  {r[1]:>15s}  {r[2]:>15s}" for r in rows]
        return "\n".join(lines)


def _truth(m) -> dict[str, Any]:
    x, y = m.twin.orbit()
    return {"orbit_x_rms": rms(x), "orbit_y_rms": rms(y),  # NaN: no closed orbit
            "orbit_x": x, "orbit_y": y, "tunes": m.twin.tunes(), "chrom": m.twin.chromaticity()}


def _design_targets(m) -> tuple[tuple[float, float], tuple[float, float]]:
    from ..twin import Twin

    ideal = Twin(m.profile, seed=None)
    q, xi = ideal.tunes(), ideal.chromaticity()
    return (round(float(q[0]), 4), round(float(q[1]), 4)), (round(float(xi[0]), 2), round(float(xi[1]), 2))


def _orbit_figure(before: dict, after: dict, m, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(m.twin.ring.get_s_pos(m.profile.bpm_refpts))
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, k, lab in ((axes[0], "orbit_x", "x"), (axes[1], "orbit_y", "y")):
        ax.plot(s, before[k] * 1e3, color="tab:red", lw=0.8,
                label=f"before ({before[k + '_rms'] * 1e6:.0f} um rms)")
        ax.plot(s, after[k] * 1e3, color="tab:blue", lw=0.8, label=f"after ({after[k + '_rms'] * 1e6:.1f} um rms)")
        ax.set_ylabel(f"{lab} [mm]")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[1].set_xlabel("s [m]")
    fig.suptitle(f"{m.profile.facility} {m.profile.accelerator}: closed orbit at the BPMs (truth)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run_demo(profile: str = "ebs", seed: int = 1, *, catalog_dir: str | Path | None = None,
             out_dir: str | Path = "acc_bluesky_demo", progress: bool = True, echo=print,
             error_scale: float | None = None, full: bool = False) -> DemoResult:
    """Run the virtual commissioning of ``profile`` with error ``seed``; see the module docstring.

    ``error_scale`` multiplies the profile's alignment error table (``None``: the profile's own ``errors.scale``;
    ``1.0``: the whole table). Where the errors leave no closed orbit, the demo first threads the injected beam
    through the first turns (``thread_first_turns``), as commissioning does, then goes on. ``full`` adds beam-based
    alignment (parallel ``measure_bba`` of every BPM, ``apply_bba``) and an orbit correction to the golden orbit."""
    from .. import plans as ap
    from ..analysis import OrbitResponse
    from ..analysis.plots import tune_diagram
    from ..data import make_run_engine, open_catalog, read_results
    from ..machine import NoClosedOrbitWarning, connect

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    echo(f"[1/7] twin of {profile!r} with error seed {seed}"
         + (f", alignment errors x{error_scale:g}" if error_scale is not None else "") + " ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoClosedOrbitWarning)  # said below, and handled: threading
        m = connect(profile, mode="sim", seed=seed, **({} if error_scale is None else {"error_scale": error_scale}))
    RE = make_run_engine(catalog_dir=catalog_dir, progress=progress)  # noqa: N806 - bluesky's name
    RE.wait_written = False  # each run is written while the next step measures; waited for before it is read back
    cat = open_catalog(catalog_dir=catalog_dir)
    before = _truth(m)
    qt, xit = _design_targets(m)
    res = DemoResult(profile=profile, seed=seed, before=before, after={}, catalog=str(catalog_dir or "default"))

    def step(key: str, title: str, plan) -> str:
        echo(title)
        t = time.perf_counter()
        try:
            uid = RE(plan).plan_result
        except BaseException:
            RE.wait_for_catalog()  # what the step recorded is written before its error goes up
            raise
        res.seconds[key] = time.perf_counter() - t
        res.uids[key] = uid
        return uid

    step("save_config", "[2/7] saving the machine configuration ...", ap.save_config(m, name="before demo"))
    if m.twin.observables().lost:  # no closed orbit: thread the first turns, then the ring tools can start
        step("thread_first_turns", "[2b/7] no closed orbit with these errors: threading the first turns "
             "(injection steering, first turn, stitch, balance) ...", ap.thread_first_turns(m, turns=2))
        if m.sext:  # the threaded orbit passes the sextupoles off-centre: their feed-down may leave no stored beam
            uid = step("ramp_sextupoles", "[2c/7] sextupoles down until the threaded beam has a closed orbit, the "
                       "orbit corrected, back up in steps ...", ap.ramp_sextupoles(m, orm="model", fit_rf=True))
            RE.wait_for_catalog()
            ramp = read_results(cat[uid])
            if not int(ramp["success"]):
                raise RuntimeError(f"the beam of {profile!r} seed {seed} makes 2 turns but has no closed orbit with "
                                   f"the sextupoles at full strength ({ramp['message']}): try another seed or a "
                                   "smaller error_scale")
        if m.twin.observables().lost:
            RE.wait_for_catalog()
            raise RuntimeError(f"the beam of {profile!r} seed {seed} makes 2 turns but still has no stable closed "
                               "orbit: try another seed or a smaller error_scale")
    orm_uid = step("orbit_response", "[3/7] measuring the orbit response matrix (all correctors, both planes, RF column) ...",
                   ap.measure_orm(m, rf=True))
    step("correct_orbit", "[4/7] correcting the orbit (SVD, RF frequency fit) ...",
         ap.correct_orbit(m, orm=orm_uid, fit_rf=True))
    step("dispersion", "[5/7] measuring the dispersion (RF frequency step) ...", ap.measure_dispersion(m))
    if full:
        bba = step("bba", "[5b/7] beam-based alignment of every BPM (parallel method) ...",
                   ap.measure_bba(m, method="parallel"))
        golden = step("golden_orbit", "[5c/7] the BBA offsets as the golden orbit, and the orbit corrected to it ...",
                      ap.apply_bba(m, bba))
        step("correct_orbit_bba", "      correcting the orbit to the golden orbit ...",
             ap.correct_orbit(m, orm=orm_uid, fit_rf=True, target=golden))
    q_before = m.twin.tunes()
    step("correct_tune", f"[6/7] correcting the tunes to {qt} ...", ap.correct_tune(m, target=qt))
    step("correct_chromaticity", f"[7/7] correcting the chromaticity to {xit} ...",
         ap.correct_chromaticity(m, target=xit))
    after = _truth(m)
    after["tune_target"], after["chrom_target"] = qt, xit
    res.after = after

    res.figures["orbit"] = _orbit_figure(before, after, m, out / "orbit_before_after.png")
    RE.wait_for_catalog()  # every run written and its figures drawn
    resp = OrbitResponse.from_run(cat[orm_uid])
    res.figures["orm"] = str(resp.plot(out / "orbit_response.png"))
    res.figures["tune_diagram"] = str(tune_diagram(
        float(after["tunes"][0]), float(after["tunes"][1]), out / "tune_diagram.png", history=[q_before],
        target=qt, title=f"{m.profile.facility} {m.profile.accelerator}: tunes before and after correct_tune"))
    res.seconds["total"] = time.perf_counter() - t0
    return res
