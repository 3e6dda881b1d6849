"""The linear model behind LOCO: closed-orbit response, dispersion and their gradient derivatives, from maps.

Everything comes from one pyAT tracking call (``at.find_m66`` at the observation points: 12 particles, one turn)
plus linear algebra, so the full EBS response (224 BPMs x 448 correctors, both planes, coupled) costs ~30 ms and
its derivative with respect to 256 quadrupole gradients ~1 s.

Notation (4D, ``z = (x, px, y, py)``; ``delta`` the momentum deviation, ``ct`` the path lengthening):

- ``A_s``: the 4x4 map from the lattice entrance to point ``s``; ``T`` the one-turn map; ``M_s`` the 6x6 map.
- A jump ``k`` (4-vector) of the orbit at a source point ``s`` moves the closed orbit at an observation point ``o``
  by ``G_os k`` with ``G_os = A_o (I - T)^-1 A_s^-1`` if ``o`` is downstream of ``s`` and
  ``A_o (I - T)^-1 T A_s^-1`` otherwise (exact linear closed-orbit response, coupling included).
- The same jump lengthens the turn by ``c_s k`` (``c_s`` a 4-row-vector from the ``ct`` row of the 6x6 maps).
- At fixed RF frequency (fixed path length, the twin's and a real ring's convention) the beam energy moves to
  cancel that lengthening: ``R = G v - eta_o (c v) / (alpha_c L)``, with ``eta`` the dispersion and ``alpha_c L``
  the path lengthening per unit ``delta`` (``L`` the length of the lattice period).
- A gradient change ``dK`` over a slice of length ``ds`` at ``s`` is a jump ``dK ds N z_s`` with
  ``N z = (0, -x, 0, y)`` (normal) or ``(0, y, 0, x)`` (skew, ``PolynomA[1]``): the derivative of the response is
  ``G_os N z_s`` summed over Gauss-Legendre slices of the element (Franchi & Liuzzo, arXiv:1711.06589, give the
  uncoupled thin-lens form ``dR_jw/dK_q = -L_q R_jq R_qw``; this is its exact coupled, thick version). The
  dispersion, the path-length term and ``alpha_c`` are differentiated the same way, so the Jacobian is that of
  the fixed-path-length matrix itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ModelResponse", "linear_response", "KINDS"]

KINDS = ("normal", "skew")  # PolynomB[1] / PolynomA[1]

_N = {
    "normal": np.array([[0, 0, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=float),
    "skew": np.array([[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=float),
}
_I4 = np.eye(4)


@dataclass
class ModelResponse:
    """Linear response of one lattice.

    Attributes:
        orm: (2n, m) closed-orbit response at fixed path length [m/rad]: rows x then y at the n BPMs, columns the
            m correctors in their own kick plane.
        orm_other: (2n, m) response to the same correctors kicking in the *other* plane [m/rad] (for corrector
            rolls), or ``None``.
        eta: (2n,) dispersion at the BPMs [m] (x then y).
        tunes: (2,) fractional tunes of the lattice period.
        alpha_l: path lengthening per unit momentum deviation over the period, ``alpha_c L`` [m].
        d_orm: (p, 2n, m) derivative of ``orm`` with respect to each parameter [m/rad per unit], or ``None``.
        d_orm_other: (p, 2n, m) the same for ``orm_other``, or ``None``.
        d_eta: (p, 2n) derivative of ``eta`` [m per unit], or ``None``.
    """

    orm: np.ndarray
    orm_other: np.ndarray | None
    eta: np.ndarray
    tunes: np.ndarray
    alpha_l: float
    d_orm: np.ndarray | None = None
    d_orm_other: np.ndarray | None = None
    d_eta: np.ndarray | None = None


_GAUSS = {n: np.polynomial.legendre.leggauss(n) for n in (1, 2, 3, 4, 5)}


def _slices(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = _GAUSS[n]
    return 0.5 * (x + 1.0), 0.5 * w  # points in (0, 1), weights summing to 1


def _elem_map(elem, orbit: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray]:
    """6x6 map of one element around ``orbit`` (its entrance), and the orbit at its exit."""
    import at

    m = at.find_elem_m66(elem, orbit, energy=energy)
    z = np.asfortranarray(orbit.reshape(6, 1).copy())
    at.element_track(elem, z, in_place=True, energy=energy)
    return m, z[:, 0]


def linear_response(ring, bpm_refpts: Sequence[int], cor_refpts: Sequence[int], cor_planes: Sequence[str],
                    params: Sequence[tuple[int, str]] = (), *, jacobian: bool = True, other_plane: bool = False,
                    n_slices: int = 3, buffer: np.ndarray | None = None) -> ModelResponse:
    """Response matrix, dispersion and (optionally) their derivatives for a 4D pyAT lattice.

    Args:
        ring: the model lattice (4D: no cavity, no radiation); it is not modified.
        bpm_refpts: (n,) lattice indices of the BPMs (orbit observed at their entrance).
        cor_refpts: (m,) lattice indices of the correctors (their ``KickAngle`` is the kick).
        cor_planes: (m,) ``"x"`` or ``"y"``: the kick plane of each corrector.
        params: ``(refpt, kind)`` per parameter: the ``PolynomB[1]`` (``"normal"``) or ``PolynomA[1]`` (``"skew"``)
            of that element; thick elements are integrated over ``n_slices`` Gauss-Legendre points, a thin one
            (zero length) takes the integrated strength.
        jacobian: compute the derivatives with respect to ``params``.
        other_plane: also the response to each corrector kicking in its other plane (for corrector rolls).
        n_slices: Gauss-Legendre points per thick element (3 is exact to ~1e-5 for usual quadrupoles).
        buffer: a (p, 2n, m) float array to write ``d_orm`` into (saves allocating 400 MB per call on EBS).
    """
    import at

    bpms = np.asarray(bpm_refpts, dtype=np.int64)
    cors = np.asarray(cor_refpts, dtype=np.int64)
    planes = np.array([0 if str(p) == "x" else 1 for p in cor_planes])
    if cors.size != planes.size:
        raise ValueError(f"{cors.size} corrector refpts but {planes.size} planes")
    nb, nc = bpms.size, cors.size
    nelem = len(ring)
    par = [(int(r), str(k)) for r, k in params]
    for r, k in par:
        if k not in KINDS:
            raise ValueError(f"parameter kind must be one of {KINDS}, got {k!r}")
        if not 0 <= r < nelem:
            raise IndexError(f"parameter element index {r} out of range 0..{nelem - 1}")
    energy = float(ring.energy)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prefs = np.unique(np.concatenate([bpms, cors, cors + 1, np.array([r for r, _ in par], dtype=np.int64)]))
        orbit0, orbits = at.find_orbit4(ring, refpts=prefs.astype(np.uint32))
        orbit0 = np.asarray(orbit0, dtype=float)
        orbit0[4:] = 0.0
        m66, ms = at.find_m66(ring, refpts=prefs.astype(np.uint32), orbit=orbit0)
    pos = {int(r): i for i, r in enumerate(prefs)}
    T = m66[:4, :4]
    inv_it = np.linalg.inv(_I4 - T)
    eta0 = inv_it @ m66[:4, 4]
    alpha_l = float(m66[5, 4] + m66[5, :4] @ eta0)
    cos_mu = 0.5 * np.array([np.trace(T[:2, :2]), np.trace(T[2:, 2:])])
    tunes = np.arccos(np.clip(cos_mu, -1, 1)) / (2 * np.pi)
    if np.sign(T[0, 1]) < 0:
        tunes[0] = 1 - tunes[0]
    if np.sign(T[2, 3]) < 0:
        tunes[1] = 1 - tunes[1]
    m66_inv_row = m66[5, :4] @ inv_it @ T  # ct of the closed orbit started by a jump (times A_s^-1, below)

    def point_data(mm: np.ndarray):
        """(P, Q, QT, eta, c) of points with 6x6 maps ``mm`` (k, 6, 6) from the entrance."""
        a = mm[:, :4, :4]
        ainv = np.linalg.inv(a)
        p = a @ inv_it
        qt = T @ ainv
        eta = np.einsum("kij,j->ki", a, eta0) + mm[:, :4, 4]
        # path lengthening per turn of a jump k at the point: closed orbit part + the rest of this turn
        minv6 = np.linalg.inv(mm)
        rest = np.einsum("j,kjl->kl", m66[5, :], minv6)[:, :4]
        c = np.einsum("j,kjl->kl", m66_inv_row, ainv) + rest
        return p, ainv, qt, eta, c

    mb = ms[[pos[int(r)] for r in bpms]]
    pb, _, _, etab4, _ = point_data(mb)
    eta_b = np.concatenate([etab4[:, 0], etab4[:, 2]])
    rows_b = pb[:, [0, 2], :]  # (nb, 2, 4): x and y rows of P at the BPMs

    # corrector jumps at their exits: kick vectors from element tracking (thick correctors are exact)
    v = np.zeros((nc, 2, 4))  # own plane, other plane
    for j, (r, pl) in enumerate(zip(cors.tolist(), planes.tolist())):
        elem = ring[r]
        z_in = np.asarray(orbits[pos[r]], dtype=float)
        ka0 = np.array(getattr(elem, "KickAngle", np.zeros(2)), dtype=float)
        e = elem.deepcopy()
        for k, kp in enumerate((pl, 1 - pl)):
            if k == 1 and not other_plane:
                continue
            h = 1e-7
            outs = []
            for sgn in (1.0, -1.0):
                ka = ka0.copy()
                ka[kp] += sgn * h
                e.KickAngle = ka
                z = np.asfortranarray(z_in.reshape(6, 1).copy())
                at.element_track(e, z, in_place=True, energy=energy)
                outs.append(z[:4, 0])
            v[j, k] = (outs[0] - outs[1]) / (2 * h)
    mw = ms[[pos[int(r) + 1] for r in cors]]
    _, ainv_w, qt_w, _, c_w6 = point_data(mw)
    src_after = np.einsum("wij,wkj->wki", ainv_w, v)  # (nc, 2, 4): A_w^-1 v  (observer downstream)
    src_before = np.einsum("wij,wkj->wki", qt_w, v)  # T A_w^-1 v (observer upstream)
    cv = np.einsum("wj,wkj->wk", c_w6, v)  # (nc, 2) path lengthening per unit kick

    downstream = bpms[:, None] >= (cors + 1)[None, :]  # BPM entrance at or after the corrector exit

    def response(k: int) -> np.ndarray:
        r1 = np.einsum("bij,wj->biw", rows_b, src_after[:, k])
        r0 = np.einsum("bij,wj->biw", rows_b, src_before[:, k])
        r = np.where(downstream[:, None, :], r1, r0)  # (nb, 2, nc)
        r4 = np.concatenate([r[:, 0], r[:, 1]], axis=0)
        return r4 - np.outer(eta_b, cv[:, k]) / alpha_l

    orm = response(0)
    orm_other = response(1) if other_plane else None
    out = ModelResponse(orm=orm, orm_other=orm_other, eta=eta_b, tunes=tunes, alpha_l=alpha_l)
    if not jacobian or not par:
        return out

    # ---- derivatives: slices of every parameter element
    tpts, twts = _slices(int(n_slices))
    s_maps, s_w, s_elem, s_pos = [], [], [], []
    for ip, (r, kind) in enumerate(par):
        elem = ring[r]
        length = float(getattr(elem, "Length", 0.0))
        m_in = ms[pos[r]]
        if length <= 0:
            s_maps.append(m_in)
            s_w.append(1.0)
            s_elem.append(ip)
            s_pos.append(r + 0.5)
            continue
        fr = np.diff(np.concatenate([[0.0], tpts]))
        pieces = elem.divide(np.concatenate([fr, [1.0 - tpts[-1]]]))[: len(tpts)]
        z = np.asarray(orbits[pos[r]], dtype=float).copy()
        m_acc = m_in
        for t, w, piece in zip(tpts, twts, pieces):
            mp, z = _elem_map(piece, z, energy)
            m_acc = mp @ m_acc
            s_maps.append(m_acc)
            s_w.append(w * length)
            s_elem.append(ip)
            s_pos.append(r + t)
    s_maps = np.asarray(s_maps)
    s_w = np.asarray(s_w)
    s_elem = np.asarray(s_elem)
    s_pos = np.asarray(s_pos)
    ps, ainv_s, qt_s, eta_s, c_s = point_data(s_maps)
    nmat = np.stack([_N[par[i][1]] for i in s_elem.tolist()])  # (ns, 4, 4)
    wn = s_w[:, None, None] * nmat

    # orbit at the slices for every corrector (own / other plane): z_s(w) = P_s (A_w^-1 or T A_w^-1) v_w
    s_down = s_pos[:, None] > (cors + 1)[None, :]  # slice downstream of the corrector exit
    # BPM rows of G_os: P_o (A_s^-1 | T A_s^-1)
    b_down = bpms[:, None] >= s_pos[None, :]  # (nb, ns)
    g1 = np.einsum("bij,sjk->sbik", rows_b, ainv_s)  # (ns, nb, 2, 4)
    g0 = np.einsum("bij,sjk->sbik", rows_b, qt_s)
    g = np.where(b_down.T[:, :, None, None], g1, g0)
    g = np.concatenate([g[:, :, 0], g[:, :, 1]], axis=1)  # (ns, 2nb, 4)
    gn = np.einsum("soj,sjk->sok", g, wn)  # (ns, 2nb, 4): response to the gradient "source" of unit dK

    d_eta = np.einsum("sok,sk->so", gn, eta_s)  # (ns, 2nb)
    cn = np.einsum("sj,sjk->sk", c_s, wn)  # (ns, 4)
    d_alpha = np.einsum("sk,sk->s", cn, eta_s)  # (ns,)

    npar = len(par)

    def per_param(x: np.ndarray) -> np.ndarray:
        outp = np.zeros((npar,) + x.shape[1:])
        np.add.at(outp, s_elem, x)
        return outp

    d_eta_p = per_param(d_eta)
    d_alpha_p = per_param(d_alpha)
    out.d_eta = d_eta_p

    slices_of = [np.flatnonzero(s_elem == ip) for ip in range(npar)]
    gx = gn[:, :, [0, 2]]  # only the x, y components of the orbit at a slice make a gradient jump

    def d_response(k: int, buf: np.ndarray | None) -> np.ndarray:
        zs1 = np.einsum("sij,wj->swi", ps[:, [0, 2]], src_after[:, k])
        zs0 = np.einsum("sij,wj->swi", ps[:, [0, 2]], src_before[:, k])
        zs = np.where(s_down[:, :, None], zs1, zs0)  # (ns, nc, 2): x, y at the slice
        dcv = per_param(np.einsum("sk,swk->sw", cn[:, [0, 2]], zs))  # (p, nc): change of the path lengthening
        cvk = cv[:, k]
        # fixed path length, R = R4 - eta (c v) / alpha_l, differentiated:
        # dR = G N z - (d_eta (c v) + eta d(c v)) / alpha_l + eta (c v) d(alpha_l) / alpha_l^2
        # all terms in one product per parameter: [G N | d_eta | eta] @ [z ; -c v / a ; (-d(c v) + c v da / a) / a]
        kmax = 2 * max(len(sel) for sel in slices_of) + 2
        a = np.zeros((npar, 2 * nb, kmax))
        b = np.zeros((npar, kmax, nc))
        for ip, sel in enumerate(slices_of):
            k2 = 2 * len(sel)
            a[ip, :, :k2] = gx[sel].transpose(1, 0, 2).reshape(2 * nb, -1)
            b[ip, :k2] = zs[sel].transpose(0, 2, 1).reshape(-1, nc)
            b[ip, k2] = -cvk / alpha_l
            b[ip, k2 + 1] = (-dcv[ip] + cvk * d_alpha_p[ip] / alpha_l) / alpha_l
            a[ip, :, k2] = d_eta_p[ip]
            a[ip, :, k2 + 1] = eta_b
        d4 = np.empty((npar, 2 * nb, nc)) if buf is None else buf
        np.einsum("pok,pkw->pow", a, b, out=d4)
        return d4

    out.d_orm = d_response(0, buffer)
    if other_plane:
        out.d_orm_other = d_response(1, None)
    return out
