"""Figures of the optics tools, written as PNG files with matplotlib's Agg canvas (no GUI, no pyplot state)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["resonance_lines", "tune_diagram", "chromaticity_fit_plot", "orbit_figure", "family_response_figure",
           "bump_figure"]

_ORDER_COLORS = {1: "black", 2: "tab:red", 3: "tab:blue", 4: "tab:green", 5: "tab:purple", 6: "tab:orange"}


def resonance_lines(order: int = 4, box: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)
                    ) -> list[tuple[int, int, int, tuple[float, float], tuple[float, float]]]:
    """Resonance lines ``m qx + n qy = p`` with ``1 <= |m| + |n| <= order`` clipped to ``box``.

    Args:
        order: highest resonance order.
        box: ``(qx_min, qx_max, qy_min, qy_max)`` in tune units.

    Returns:
        ``[(m, n, p, (x0, y0), (x1, y1)), ...]``: each line's coefficients and its segment inside the box.
    """
    x0, x1, y0, y1 = box
    out = []
    corners = [(x0, y0), (x0, y1), (x1, y0), (x1, y1)]
    for m in range(0, order + 1):
        for n in range(-order, order + 1):
            if not 1 <= abs(m) + abs(n) <= order or (m == 0 and n <= 0):
                continue
            vals = [m * cx + n * cy for cx, cy in corners]
            for p in range(math.ceil(min(vals) - 1e-12), math.floor(max(vals) + 1e-12) + 1):
                if math.gcd(math.gcd(m, abs(n)), abs(p)) > 1:
                    continue  # same line as a lower order
                pts = []
                if n != 0:
                    for x in (x0, x1):
                        y = (p - m * x) / n
                        if y0 - 1e-12 <= y <= y1 + 1e-12:
                            pts.append((x, y))
                if m != 0:
                    for y in (y0, y1):
                        x = (p - n * y) / m
                        if x0 - 1e-12 <= x <= x1 + 1e-12:
                            pts.append((x, y))
                uniq = []
                for q in pts:
                    if all(abs(q[0] - u[0]) > 1e-12 or abs(q[1] - u[1]) > 1e-12 for u in uniq):
                        uniq.append(q)
                if len(uniq) >= 2:
                    out.append((m, n, p, uniq[0], uniq[1]))
    return out


def _draw_lines(ax, order: int, box) -> None:
    for m, n, _p, a, b in resonance_lines(order, box):
        k = abs(m) + abs(n)
        ax.plot([a[0], b[0]], [a[1], b[1]], color=_ORDER_COLORS.get(k, "grey"),
                lw=max(0.4, 2.2 - 0.45 * k), ls="-" if n % 2 == 0 else "--", alpha=0.8)


def _canvas(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def tune_diagram(qx: float, qy: float, path: str | os.PathLike, history: npt.ArrayLike | None = None,
                 order: int = 4, *, target: Sequence[float] | None = None, title: str | None = None) -> Path:
    """A tune diagram: resonance lines up to ``order`` in the working-point square, the tunes marked.

    Left: the whole fractional-tune square; right: a zoom around the working points.

    Args:
        qx, qy: the working point (fractional tunes), e.g. after a correction.
        path: PNG file to write (folders are created).
        history: (k, 2) earlier working points in order (the first is "before"); drawn as a path.
        order: highest resonance order drawn (solid: normal, dashed: skew, i.e. odd vertical index).
        target: the requested working point, if any.
        title: figure title.

    Returns:
        the path written.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = np.asarray([[qx, qy]], dtype=float)
    hist = None if history is None else np.asarray(history, dtype=float).reshape(-1, 2)
    allp = pts if hist is None else np.vstack([hist, pts])
    if target is not None:
        allp = np.vstack([allp, np.asarray(target, dtype=float).reshape(1, 2)])
    allp = allp[np.all(np.isfinite(allp), axis=1)]
    fig = _canvas(11.0, 5.2)
    axes = fig.subplots(1, 2)
    span = float(np.max(np.ptp(allp, axis=0))) if len(allp) else 0.0
    half = max(0.02, 0.75 * span)
    c = allp.mean(axis=0) if len(allp) else np.array([0.5, 0.5])
    zoom = (c[0] - half, c[0] + half, c[1] - half, c[1] + half)
    for ax, box in zip(axes, [(0.0, 1.0, 0.0, 1.0), zoom]):
        _draw_lines(ax, order, box)
        if hist is not None and len(hist):
            path_pts = np.vstack([hist, pts])
            ax.plot(path_pts[:, 0], path_pts[:, 1], "-", color="0.4", lw=1.0, zorder=3)
            ax.plot(hist[1:, 0], hist[1:, 1], "o", ms=4, color="0.4", zorder=4)
            ax.plot(hist[0, 0], hist[0, 1], "s", ms=8, color="tab:orange", mec="k", label="before", zorder=5)
        ax.plot(qx, qy, "o", ms=9, color="tab:green", mec="k", label="after" if hist is not None else "tunes",
                zorder=6)
        if target is not None:
            ax.plot(target[0], target[1], "x", ms=11, mew=2.5, color="tab:red", label="target", zorder=7)
        ax.set_xlim(box[0], box[1])
        ax.set_ylim(box[2], box[3])
        ax.set_xlabel("fractional tune $q_x$")
        ax.set_ylabel("fractional tune $q_y$")
        ax.set_aspect("equal")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
    handles = [Line2D([], [], color=_ORDER_COLORS.get(k, "grey"), lw=max(0.4, 2.2 - 0.45 * k), label=f"order {k}")
               for k in range(1, order + 1)]
    handles.append(Line2D([], [], color="0.3", ls="--", lw=1.0, label="skew (odd n)"))
    axes[0].legend(handles=handles, loc="upper left", fontsize=7, framealpha=0.9)
    axes[0].set_title(f"resonances up to order {order}")
    axes[1].set_title("zoom")
    axes[1].legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def chromaticity_fit_plot(dp: npt.ArrayLike, qx: npt.ArrayLike, qy: npt.ArrayLike, coeffs: npt.ArrayLike,
                          path: str | os.PathLike, *, xi: Sequence[float] | None = None,
                          xi_std: Sequence[float] | None = None, qx_std: npt.ArrayLike | None = None,
                          qy_std: npt.ArrayLike | None = None, title: str | None = None) -> Path:
    """Tunes versus momentum deviation with the polynomial fit, one panel per plane.

    Args:
        dp: (n,) momentum deviation of each point.
        qx, qy: (n,) measured tunes.
        coeffs: (2, order + 1) fit coefficients in increasing powers of dp (x then y).
        path: PNG file to write.
        xi, xi_std: fitted chromaticities and their errors, for the legend.
        qx_std, qy_std: (n,) error bars of the tunes.
        title: figure title.

    Returns:
        the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dp = np.asarray(dp, dtype=float)
    coeffs = np.asarray(coeffs, dtype=float).reshape(2, -1)
    fig = _canvas(10.0, 4.2)
    axes = fig.subplots(1, 2)
    grid = np.linspace(np.nanmin(dp), np.nanmax(dp), 101) if dp.size else np.zeros(1)
    for k, (ax, q, s, plane) in enumerate(zip(axes, (qx, qy), (qx_std, qy_std), "xy")):
        q = np.asarray(q, dtype=float)
        err = None if s is None else np.asarray(s, dtype=float)
        ax.errorbar(dp * 1e3, q, yerr=err, fmt="o", color="tab:blue", label="measured")
        label = f"fit (order {coeffs.shape[1] - 1})"
        if xi is not None:
            label += f": $\\xi_{plane}$ = {xi[k]:.3f}"
            if xi_std is not None and np.isfinite(xi_std[k]):
                label += f" $\\pm$ {xi_std[k]:.3f}"
        ax.plot(grid * 1e3, np.polynomial.polynomial.polyval(grid, coeffs[k]), "-", color="tab:red", label=label)
        ax.set_xlabel("momentum deviation dp/p [1e-3]")
        ax.set_ylabel(f"fractional tune $q_{plane}$")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def orbit_figure(path: str | os.PathLike, s: npt.ArrayLike | None, names: Sequence[str], before, after,
                 title: str = "", labels: tuple[str, str] = ("before", "after")) -> Path:
    """Orbit (x and y [mm]) along the ring, before and after: ``before``/``after`` are ``(x, y)`` [m] at the
    BPMs at ``s`` [m] (BPM index if None); the largest residuals are labelled with their BPM names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pos = np.arange(len(names)) if s is None else np.asarray(s, dtype=float)
    fig = _canvas(10.0, 6.0)
    axes = fig.subplots(2, 1, sharex=True)
    for k, (ax, lab) in enumerate(zip(axes, ("x", "y"))):
        a, b = np.asarray(before[k], dtype=float), np.asarray(after[k], dtype=float)
        rms_a = float(np.sqrt(np.nanmean(a * a))) if np.any(np.isfinite(a)) else float("nan")
        rms_b = float(np.sqrt(np.nanmean(b * b))) if np.any(np.isfinite(b)) else float("nan")
        ax.plot(pos, a * 1e3, color="tab:red", lw=0.8, label=f"{labels[0]} ({rms_a * 1e6:.1f} um rms)")
        ax.plot(pos, b * 1e3, color="tab:blue", lw=0.8, label=f"{labels[1]} ({rms_b * 1e6:.1f} um rms)")
        if np.any(np.isfinite(b)):
            for i in np.argsort(-np.nan_to_num(np.abs(b)))[:3]:
                ax.annotate(str(names[i]), (pos[i], b[i] * 1e3), fontsize=6, color="tab:blue")
        ax.set_ylabel(f"{lab} [mm]")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[1].set_xlabel("BPM index" if s is None else "s [m]")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def family_response_figure(path: str | os.PathLike, families: Sequence[str], matrix_hw: npt.ArrayLike,
                           observable: str = "tune", *, model_hw: npt.ArrayLike | None = None,
                           reference: Sequence[float] | None = None, title: str = "") -> Path:
    """The response of the two observables (``"tune"``: Qx, Qy; ``"chromaticity"``: xi_x, xi_y) to each family, per
    ampere of the family's setpoint: one bar per family and plane, beside the model's (``model_hw``, same shape)
    when given. ``matrix_hw``: (2, n) [1/A]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.asarray(matrix_hw, dtype=float).reshape(2, -1)
    n = m.shape[1]
    sym = {"tune": ("Q_x", "Q_y"), "chromaticity": ("\\xi_x", "\\xi_y")}.get(observable, ("x", "y"))
    fig = _canvas(max(6.0, 1.0 + 0.7 * n), 5.5)
    axes = fig.subplots(2, 1, sharex=True)
    pos = np.arange(n)
    width = 0.38 if model_hw is not None else 0.7
    model = None if model_hw is None else np.asarray(model_hw, dtype=float).reshape(2, -1)
    for k, ax in enumerate(axes):
        ax.bar(pos - (width / 2 if model is not None else 0.0), m[k], width, color="tab:blue", label="measured")
        if model is not None:
            ax.bar(pos + width / 2, model[k], width, color="tab:grey", alpha=0.7, label="model")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_ylabel(f"$d{sym[k]}/dI$ [1/A]")
        ax.grid(alpha=0.3, axis="y")
        if model is not None:
            ax.legend(loc="best", fontsize=8)
    axes[1].set_xticks(pos)
    axes[1].set_xticklabels([str(f) for f in families], rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    axes[1].set_xlabel("family (every in-service magnet stepped)")
    head = title or f"{observable} response per family"
    if reference is not None and np.all(np.isfinite(np.asarray(reference, dtype=float))):
        r = np.asarray(reference, dtype=float)
        head += f"  (at ${sym[0]}$ = {r[0]:.4g}, ${sym[1]}$ = {r[1]:.4g})"
    fig.suptitle(head)
    fig.tight_layout()
    fig.savefig(path)
    return path


def bump_figure(path: str | os.PathLike, s: npt.ArrayLike, names: Sequence[str], change_x: npt.ArrayLike,
                change_y: npt.ArrayLike, inside: npt.ArrayLike, bpm: int, *,
                correctors: Sequence[tuple[str, float, str]] = (), amplitude: Sequence[float | None] = (None, None),
                closure_rms: float = float("nan"), title: str = "") -> Path:
    """An orbit bump: the orbit change x and y [mm] at the BPMs along ``s`` [m], the BPMs inside the bump's span
    shaded, the bump's correctors marked (``(name, s, plane)``), the bumped BPM and its requested amplitude [m].
    A plane whose change stays below 10 um is drawn in um."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pos = np.asarray(s, dtype=float)
    ins = np.asarray(inside, dtype=bool)
    fig = _canvas(10.0, 6.0)
    axes = fig.subplots(2, 1, sharex=True)
    for k, (ax, lab, d) in enumerate(zip(axes, ("x", "y"), (change_x, change_y))):
        d = np.asarray(d, dtype=float)
        amp = amplitude[k] if k < len(amplitude) else None
        big = max(float(np.nanmax(np.abs(d), initial=0.0)), abs(amp) if amp is not None and np.isfinite(amp) else 0.0)
        scale, unit = (1e3, "mm") if big >= 1e-5 else (1e6, "um")
        d = d * scale
        if ins.any():
            lo, hi = float(pos[ins].min()), float(pos[ins].max())
            ax.axvspan(lo, hi, color="tab:orange", alpha=0.12, lw=0, label="bump span")
        ax.plot(pos, d, color="tab:blue", lw=0.8, marker=".", ms=3, label=f"{lab} change")
        for name, sc, plane in correctors:
            if plane == lab:
                ax.axvline(sc, color="tab:green", lw=0.8, ls="--")
                ax.annotate(str(name), (sc, 0.0), xytext=(2, 4), textcoords="offset points", fontsize=6,
                            color="tab:green", rotation=90)
        ax.plot([pos[bpm]], [d[bpm]], marker="o", color="tab:red", ms=6, ls="none",
                label=f"{names[bpm]}: {d[bpm]:.4g} {unit}")
        if amp is not None and np.isfinite(amp):
            ax.plot([pos[bpm]], [amp * scale], marker="x", color="black", ms=8, ls="none",
                    label=f"requested {amp * scale:.4g} {unit}")
        ax.set_ylabel(f"{lab} change [{unit}]")
        ax.legend(loc="upper right", fontsize=7)
        ax.grid(alpha=0.3)
    axes[1].set_xlabel("s [m]")
    head = title or f"orbit bump at {names[bpm]}"
    if np.isfinite(closure_rms):
        head += f"  (closure outside the span: {closure_rms * 1e6:.3g} um rms)"
    fig.suptitle(head)
    fig.tight_layout()
    fig.savefig(path)
    return path
