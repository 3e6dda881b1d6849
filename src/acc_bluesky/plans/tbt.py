"""Turn-by-turn optics as a Bluesky plan: ``measure_tbt`` (a pinger kick, N turns at every BPM, NAFF tunes,
phase advance and beta from phase).

A :func:`~acc_bluesky.plan_stubs.tool.tool`: one run (tool name ``tbt``), one event per shot in ``primary``
(the (n_bpm, turns) readings and the loss monitor), the optics in the ``results`` stream
(``TbtResult.from_run(run)``), figures of the spectrum, the phase-advance beating and the beta-beat. The BPM
acquisition mode, the number of turns and the pinger kicks are put back as they were, whatever happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from ..analysis.tbt import TbtResult, analyse_tbt, kick_for_amplitude, model_optics
from ..machine import Machine
from ..plan_stubs.machine import BeamLostError, Record, emit, move
from ..plan_stubs.tool import open_tool_run, thread_safe_figure, tool
from ..plan_stubs.trajectory import (
    beam_settings,
    need_beam_devices,
    restore_beam_settings,
    set_acquisition,
    shot,
)

__all__ = ["measure_tbt"]

#: default oscillation amplitude of a TbT kick [m] (mean over the BPMs)
TBT_AMPLITUDE = 1e-4


def _figure(draw: str):
    @thread_safe_figure
    def write(result: TbtResult, path: Path) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10.0, 4.0), dpi=110)
        FigureCanvasAgg(fig)
        getattr(result, draw)(fig.subplots())
        fig.suptitle(f"TbT: q = ({result.tunes[0]:.5f}, {result.tunes[1]:.5f}), {result.turns} turns, kick "
                     f"({result.kick[0] * 1e6:.1f}, {result.kick[1] * 1e6:.1f}) urad")
        fig.tight_layout()
        fig.savefig(path)

    return write


_FIGURES = {"spectrum": _figure("plot_spectrum"), "phase_beating": _figure("plot_phase"),
            "beta_beat": _figure("plot_beta")}


@tool("tbt", ring_only="turn-by-turn optics needs a stored beam that comes back turn after turn",
      figures=_FIGURES)
def measure_tbt(machine: Machine, kick: Sequence[float] | None = None, turns: int = 1024, n_avg: int = 1,
                amplitude: float | None = None, method: str = "fft", n_bpm: int = 21,
                figure_dir: str | Path | bool | None = None, md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """Kick the stored beam with the pinger and measure tunes, phase advance and beta from phase at every BPM.

    The BPMs are put in ``tbt`` mode for ``turns`` turns, the pinger fires ``n_avg`` times (the same kick: the
    readings are averaged, the noise falls as 1/sqrt(n_avg)), and the averaged (n_bpm, turns) data are analysed by
    :func:`~acc_bluesky.analysis.tbt.analyse_tbt` against the model optics: tunes by interpolated FFT (pyAT's
    harmonic analysis, ``method="fft"``) or NAFF (``method="naff"``, nafflib), phases by a least-squares fit at the
    tunes, beta from phase by the N-BPM method, bad BPMs flagged.

    Args:
        machine: the connected machine (a ring).
        kick: pinger kick (x, y) [rad]; default: sized for a mean oscillation of ``amplitude``.
        turns: turns recorded after the kick.
        n_avg: shots averaged.
        amplitude: mean oscillation amplitude [m] the default kick aims at (default 1e-4 m).
        method: tune method: ``"fft"`` (default) or ``"naff"``.
        n_bpm: BPMs in the beta-from-phase window (odd >= 3; 3 = the three-BPM method).
        figure_dir: folder of the figures (``spectrum``, ``phase_beating``, ``beta_beat``); ``False``: none.
        md: metadata merged into the run's start document.

    Returns:
        the run uid; ``TbtResult.from_run(cat[uid])`` gives ``bpm_names``, ``tunes`` (qx, qy), ``phase`` and
        ``beta`` ((n, 2) [2 pi], [m]), ``beta_beat``, ``bad`` BPMs and ``kick`` [rad].
    """
    need_beam_devices(machine, "measure_tbt")
    if method not in ("fft", "naff"):
        raise ValueError(f"method must be 'fft' or 'naff', got {method!r}")
    if turns < 16:
        raise ValueError(f"turns must be >= 16 for a TbT analysis (1024 is usual), got {turns}")
    if kick is None:
        k = kick_for_amplitude(machine.profile, TBT_AMPLITUDE if amplitude is None else float(amplitude))
    else:
        k = np.broadcast_to(np.asarray(kick, dtype=float), (2,)).copy()
        if not np.all(np.isfinite(k)):
            raise ValueError(f"kick must be two finite numbers (x, y) [rad], got {kick!r}")
    model_optics(machine)  # the model (cached) before anything moves: a bad lattice refuses here
    snap = yield from beam_settings(machine)
    n = len(machine.bpm)

    def inner() -> MsgGenerator[TbtResult]:
        yield from set_acquisition(machine, "tbt", turns)
        yield from move(machine.pinger.kick_x, float(k[0]), machine.pinger.kick_y, float(k[1]))
        yield from open_tool_run(bpm_names=machine.bpm.names, tbt_method=method, n_bpm=int(n_bpm),
                                 kick=[float(k[0]), float(k[1])], turns=int(turns), num_points=int(n_avg))
        rec = Record("tbt_shot", {
            "shot": ("", (), "shot number (1-based)"),
            "x": ("m", (n, int(turns)), "horizontal readings (BPM x turn) after the kick"),
            "y": ("m", (n, int(turns)), "vertical readings (BPM x turn) after the kick"),
            "turns_reached": ("turns", (), "turns the beam made (loss monitor)")},
            hinted=("shot", "turns_reached"), dtypes={"shot": "integer"})
        sx = sy = None
        for i in range(int(n_avg)):
            x, y, loss = yield from shot(machine, machine.pinger)
            rec.update(shot=i + 1, x=x, y=y, turns_reached=float(loss.get("turns_reached", np.nan)))
            yield from emit(rec)
            lost = int(loss.get("lost_turn", -1))
            if lost >= 0:
                raise BeamLostError(
                    f"measure_tbt: the beam was lost in turn {lost} after the kick ({loss.get('lost_element_name')}, "
                    f"s = {float(loss.get('lost_s', np.nan)):.2f} m): lower the kick ({k.tolist()} rad) or the "
                    "turns. The BPM mode and the pinger were put back.")
            sx = x if sx is None else sx + x
            sy = y if sy is None else sy + y
        xa, ya = sx / n_avg, sy / n_avg
        return analyse_tbt(xa.T, ya.T, machine, kick=k,
                           method=method, n_bpm=int(n_bpm),
                           metadata={"profile": machine.profile.name, "seed": machine.seed, "n_avg": int(n_avg)})

    return (yield from bpp.finalize_wrapper(inner(), restore_beam_settings(machine, snap, injection=False)))
