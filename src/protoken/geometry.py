"""Backbone geometry: the virtual C-beta and trRosetta's inter-residue 6D features.

All functions are vectorised numpy; the per-point ones broadcast over leading dimensions.
Coordinates are in Angstrom, angles in radians. The formulas are the reference design's
(trRosetta, Yang et al. 2020):

- virtual Cb = -0.58273431 a + 0.56802827 b - 0.54067466 c + CA, with b = CA - N, c = C - CA,
  a = b x c;
- for residues i != j with d_ij < dmax: d_ij = |Cb_j - Cb_i|,
  omega_ij = dihedral(CA_i, Cb_i, Cb_j, CA_j), theta_ij = dihedral(N_i, CA_i, Cb_i, Cb_j),
  phi_ij = angle(CA_i, Cb_i, Cb_j); every other pair (i == j included) gets d = dmax and
  omega = theta = phi = 0.

The pair functions (:func:`pairwise_distances`, :func:`omega_parts`, :func:`ca_directions`)
are shared by the forward direction (:func:`sixd`) and the way back (:mod:`protoken.reconstruct`,
:mod:`protoken.backbone`), so each formula exists once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "SixD",
    "angle",
    "ca_directions",
    "clipped_fraction",
    "cross",
    "dihedral",
    "omega_parts",
    "pairwise_distances",
    "sixd",
    "virtual_cb",
]

CB_A, CB_B, CB_C = -0.58273431, 0.56802827, -0.54067466

#: Default distance cut-off of the 6D features, Angstrom (the reference design's ``dmax``).
DMAX = 80.0


class SixD(NamedTuple):
    """trRosetta 6D features of an L-residue chain, each an (L, L) float64 array.

    ``d`` and ``omega`` are symmetric; ``theta`` and ``phi`` are not (row i is the residue whose
    frame the angle is measured in).
    """

    d: np.ndarray
    omega: np.ndarray
    theta: np.ndarray
    phi: np.ndarray


def cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross product over the last axis, shapes (..., 3) (np.cross has a large fixed cost on
    small arrays)."""
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    return np.stack((a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0), axis=-1)


def virtual_cb(n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Ideal C-beta position from the backbone N, CA, C.

    Parameters
    ----------
    n, ca, c : ndarray, shape (..., 3)
        Backbone atom coordinates.

    Returns
    -------
    ndarray, shape (..., 3)
        Virtual C-beta coordinates (the reference design's formula; used for glycine too).
    """
    b = ca - n
    c_ = c - ca
    a = cross(b, c_)
    return CB_A * a + CB_B * b + CB_C * c_ + ca


def dihedral(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Dihedral angle of the points a-b-c-d, in (-pi, pi].

    The reference design's formula: b0 = a - b, b1 = (c - b) / |c - b|, b2 = d - c, v and w the
    parts of b0 and b2 perpendicular to b1, angle = atan2((b1 x v) . w, v . w).

    Parameters
    ----------
    a, b, c, d : ndarray, shape (..., 3)

    Returns
    -------
    ndarray, shape (...)
    """
    b0 = a - b
    b1 = c - b
    b1 = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    b2 = d - c
    v = b0 - np.sum(b0 * b1, axis=-1, keepdims=True) * b1
    w = b2 - np.sum(b2 * b1, axis=-1, keepdims=True) * b1
    x = np.sum(v * w, axis=-1)
    y = np.sum(cross(b1, v) * w, axis=-1)
    return np.arctan2(y, x)


def angle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Planar angle a-b-c (at b), in [0, pi].

    Parameters
    ----------
    a, b, c : ndarray, shape (..., 3)

    Returns
    -------
    ndarray, shape (...)
    """
    v = a - b
    w = c - b
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    w = w / np.linalg.norm(w, axis=-1, keepdims=True)
    return np.arccos(np.clip(np.sum(v * w, axis=-1), -1.0, 1.0))


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix of points.

    Computed from the Gram matrix of the centred points, |x_i|^2 + |x_j|^2 - 2 x_i.x_j: no
    (L, L, 3) array, so L = 1024 takes a few milliseconds; the error is ~1e-12 A for protein
    coordinates.

    Parameters
    ----------
    x : array_like, shape (L, 3)

    Returns
    -------
    ndarray, shape (L, L)
        Symmetric (to rounding), zero diagonal.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0) if len(x) else x
    sq = x @ x.T
    sq *= -2.0
    norms = np.einsum("ik,ik->i", x, x)
    sq += norms[:, None]
    sq += norms[None, :]
    dist = np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq)
    np.fill_diagonal(dist, 0.0)
    return dist


def omega_parts(cb: np.ndarray, u: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """omega_ij = dihedral(CA_i, Cb_i, Cb_j, CA_j) of all pairs, as the (y, x) of atan2(y, x).

    With u_i the unit vector along Cb_i - CA_i and e_ij = (Cb_j - Cb_i) / d_ij, the dihedral's
    b0 = -|.| u_i, b1 = e_ij and b2 = -|.| u_j; positive scales leave atan2 unchanged and the
    parts along b1 drop out, so x = u_i.u_j - (u_i.e)(u_j.e) and
    y = e.(u_i x u_j) = (u_i.(u_j x Cb_j) - u_j.(Cb_i x u_i)) / d. Every term is an
    (L, 3) x (3, L) product; no (L, L, 3) array is formed.

    Parameters
    ----------
    cb, u : ndarray, shape (L, 3)
        C-beta coordinates (best centred: the products are then better conditioned) and the unit
        vectors (Cb - CA) / |Cb - CA|.
    inv : ndarray, shape (L, L)
        1 / d_ij, and 0 where the angle is undefined (i == j, coincident Cb).

    Returns
    -------
    y, x : ndarray, shape (L, L)
        omega = atan2(y, x); y / hypot(x, y) is sin(omega).
    """
    uc = np.einsum("ik,ik->i", u, cb)
    ui_e = u @ cb.T  # u_i . (Cb_j - Cb_i) = (u @ Cb.T)_ij - u_i.Cb_i
    ui_e -= uc[:, None]
    x = cb @ u.T  # u_j . (Cb_j - Cb_i) = u_j.Cb_j - (Cb @ u.T)_ij
    np.subtract(uc[None, :], x, out=x)
    x *= ui_e
    x *= inv
    x *= inv
    np.subtract(u @ u.T, x, out=x)
    y = u @ cross(u, cb).T
    y -= cross(cb, u) @ u.T
    y *= inv
    return y, x


def ca_directions(cb, phi, mask) -> np.ndarray:
    """Unit vectors from each Cb to its CA, placed from the phi angles (the inverse of phi).

    phi_ij = angle(CA_i, Cb_i, Cb_j), so w_i = (CA_i - Cb_i) / |CA_i - Cb_i| satisfies
    w_i . e_ij = cos(phi_ij) with e_ij the unit vector from Cb_i to Cb_j. Each w_i is the
    least-squares solution over every partner j in ``mask`` (a 3x3 system per residue,
    assembled with (L, L) x (L, 9) products), then normalised.

    Parameters
    ----------
    cb : array_like, shape (L, 3)
    phi : array_like, shape (L, L)
        Radians; row i is measured at residue i.
    mask : array_like of bool, shape (L, L)
        Pairs to use (known distances, i != j).

    Returns
    -------
    ndarray, shape (L, 3)
        Unit vectors (for a residue with no usable partner: the direction away from the
        centroid, a fallback that only matters for degenerate input).
    """
    cb = np.asarray(cb, dtype=np.float64)
    cb = cb - cb.mean(axis=0)
    length = len(cb)
    r = pairwise_distances(cb)
    m = np.asarray(mask, dtype=bool) & (r > 1e-6)
    np.fill_diagonal(m, False)
    inv = np.divide(1.0, r, out=np.zeros_like(r), where=m)
    g = inv * inv  # weights of e e^T = (cb_j - cb_i)(cb_j - cb_i)^T / r^2
    h = np.cos(np.asarray(phi, dtype=np.float64)) * inv  # weights of cos(phi) e
    outer = (cb[:, :, None] * cb[:, None, :]).reshape(length, 9)
    gsum = g.sum(axis=1)
    gcb = g @ cb
    a = (g @ outer).reshape(length, 3, 3)
    a -= cb[:, :, None] * gcb[:, None, :]
    a -= gcb[:, :, None] * cb[:, None, :]
    a += gsum[:, None, None] * (cb[:, :, None] * cb[:, None, :])
    b = h @ cb - h.sum(axis=1)[:, None] * cb
    # a tiny ridge keeps the 3x3 systems solvable when partners are few or collinear
    ridge = 1e-10 * np.trace(a, axis1=1, axis2=2) + 1e-12
    a += ridge[:, None, None] * np.eye(3)
    w = np.linalg.solve(a, b[:, :, None])[:, :, 0]
    norm = np.linalg.norm(w, axis=1)
    bad = ~(np.isfinite(norm) & (norm > 1e-8))
    if bad.any():
        fallback = cb[bad] / np.maximum(np.linalg.norm(cb[bad], axis=1, keepdims=True), 1e-12)
        fallback[np.linalg.norm(fallback, axis=1) < 0.5] = (1.0, 0.0, 0.0)
        w[bad] = fallback
        norm[bad] = 1.0
    return w / norm[:, None]


def clipped_fraction(d: np.ndarray, dmax: float = DMAX) -> float:
    """The fraction of residue pairs i < j whose distance is clipped (d >= dmax): stored in the
    image as "at least dmax apart", without angles.

    Parameters
    ----------
    d : ndarray, shape (L, L)
        Distances, e.g. :attr:`SixD.d` (whose diagonal holds dmax: not counted).
    dmax : float

    Returns
    -------
    float
        In [0, 1]; 0 for fewer than 2 residues.
    """
    d = np.asarray(d)
    length = len(d)
    if length < 2:
        return 0.0
    far = int(np.count_nonzero(d >= dmax)) - int(np.count_nonzero(np.diagonal(d) >= dmax))
    return far / (length * (length - 1))


def sixd(
    n: np.ndarray,
    ca: np.ndarray,
    c: np.ndarray,
    dmax: float = DMAX,
    cb: np.ndarray | None = None,
) -> SixD:
    """trRosetta 6D inter-residue features of one chain.

    Parameters
    ----------
    n, ca, c : ndarray, shape (L, 3)
        Backbone coordinates, Angstrom.
    dmax : float
        Distance cut-off, Angstrom. Pairs at d >= dmax and the diagonal get d = dmax and zero
        angles.
    cb : ndarray, shape (L, 3), optional
        C-beta coordinates to use instead of the virtual C-beta of N, CA, C.

    Returns
    -------
    SixD
        ``d`` (Angstrom), ``omega``, ``theta`` in (-pi, pi], ``phi`` in [0, pi]; each (L, L).

    Notes
    -----
    Fully vectorised: per-residue vectors are computed once and every pair term is a matrix
    product, so no (L, L, 3) array is formed (L = 1024 in well under 0.1 s).
    """
    n = np.asarray(n, dtype=np.float64)
    ca = np.asarray(ca, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    cb = virtual_cb(n, ca, c) if cb is None else np.asarray(cb, dtype=np.float64)
    dist = pairwise_distances(cb)
    origin = cb.mean(axis=0) if len(cb) else np.zeros(3)
    n, ca, cb = n - origin, ca - origin, cb - origin  # features are translation invariant
    mask = dist < dmax
    np.fill_diagonal(mask, False)
    # 1 / d; coincident Cb (degenerate input) give zero vectors, hence finite angles, never NaN
    inv = np.divide(1.0, dist, out=np.zeros_like(dist), where=dist > 0)

    # u_i: unit vector along Cb_i - CA_i, the axis shared by omega and theta. Every projection
    # of delta_ij = Cb_j - Cb_i on a per-residue vector p_i is (p @ Cb.T)_ij - p_i.Cb_i, so all
    # pair terms below are (L, 3) x (3, L) products rather than (L, L, 3) arrays.
    u = cb - ca
    u /= np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)

    def project(vec: np.ndarray) -> np.ndarray:
        """(vec_i . delta_ij) for all i, j."""
        out = vec @ cb.T
        out -= np.einsum("ik,ik->i", vec, cb)[:, None]
        return out

    # omega_ij = dihedral(CA_i, Cb_i, Cb_j, CA_j)
    y, x = omega_parts(cb, u, inv)
    omega = np.arctan2(y, x, out=y)

    # theta_ij = dihedral(N_i, CA_i, Cb_i, Cb_j): axis u_i, b0 = N_i - CA_i, b2 = delta_ij.
    b0 = n - ca
    v = b0 - np.sum(b0 * u, axis=-1, keepdims=True) * u
    theta = np.arctan2(project(cross(u, v)), project(v))

    # phi_ij = angle(CA_i, Cb_i, Cb_j): between -u_i and e_ij.
    a_i = project(u)  # u_i . delta_ij
    a_i *= inv
    np.negative(a_i, out=a_i)
    phi = np.arccos(np.clip(a_i, -1.0, 1.0, out=a_i), out=a_i)

    for angles in (omega, theta, phi):
        angles *= mask
    np.copyto(dist, dmax, where=~mask)
    return SixD(d=dist, omega=omega, theta=theta, phi=phi)
