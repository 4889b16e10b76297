"""Backbone geometry: the virtual C-beta and trRosetta's inter-residue 6D features.

All functions are vectorised numpy and broadcast over leading dimensions. Coordinates are in
Angstrom, angles in radians. The formulas are the seed's (trRosetta, Yang et al. 2020):

- virtual Cb = -0.58273431 a + 0.56802827 b - 0.54067466 c + CA, with b = CA - N, c = C - CA,
  a = b x c;
- for residues i != j with d_ij < dmax: d_ij = |Cb_j - Cb_i|,
  omega_ij = dihedral(CA_i, Cb_i, Cb_j, CA_j), theta_ij = dihedral(N_i, CA_i, Cb_i, Cb_j),
  phi_ij = angle(CA_i, Cb_i, Cb_j); every other pair (i == j included) gets d = dmax and
  omega = theta = phi = 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["SixD", "angle", "dihedral", "pairwise_distances", "sixd", "virtual_cb"]

CB_A, CB_B, CB_C = -0.58273431, 0.56802827, -0.54067466

#: Default distance cut-off of the 6D features, Angstrom (the seed's ``dmax``).
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


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross product over the last axis (np.cross has a large fixed cost on small arrays)."""
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
        Virtual C-beta coordinates (the seed's formula; used for glycine too).
    """
    b = ca - n
    c_ = c - ca
    a = _cross(b, c_)
    return CB_A * a + CB_B * b + CB_C * c_ + ca


def dihedral(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Dihedral angle of the points a-b-c-d, in (-pi, pi].

    The seed's formula: b0 = a - b, b1 = (c - b) / |c - b|, b2 = d - c, v and w the parts of b0
    and b2 perpendicular to b1, angle = atan2((b1 x v) . w, v . w).

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
    y = np.sum(_cross(b1, v) * w, axis=-1)
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
    """Euclidean distance matrix of points x, shape (L, 3) -> (L, L)."""
    diff = x[:, None, :] - x[None, :, :]
    return np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))


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
    origin = cb.mean(axis=0) if len(cb) else np.zeros(3)
    n, ca, cb = n - origin, ca - origin, cb - origin  # features are translation invariant

    # d_ij = |Cb_j - Cb_i| from the Gram matrix of the centred Cb (error ~1e-12 A).
    sq = cb @ cb.T
    sq *= -2.0
    norms = np.einsum("ik,ik->i", cb, cb)
    sq += norms[:, None]
    sq += norms[None, :]
    dist = np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq)
    np.fill_diagonal(dist, 0.0)
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

    a_i = project(u)  # u_i . delta_ij
    a_j = cb @ u.T  # u_j . delta_ij = u_j.Cb_j - u_j.Cb_i
    np.subtract(np.einsum("ik,ik->i", u, cb)[None, :], a_j, out=a_j)

    # omega_ij = dihedral(CA_i, Cb_i, Cb_j, CA_j): b0 = -|.| u_i, b1 = e_ij = delta_ij / d_ij,
    # b2 = -|.| u_j. Positive scales leave atan2 unchanged and the parts along b1 drop out:
    # x = u_i.u_j - (u_i.e)(u_j.e), y = e.(u_i x u_j) = (u_i.(u_j x Cb_j) - u_j.(Cb_i x u_i)) / d.
    a_j *= a_i
    a_j *= inv
    a_j *= inv
    x = u @ u.T
    x -= a_j
    y = u @ _cross(u, cb).T
    y -= _cross(cb, u) @ u.T
    y *= inv
    omega = np.arctan2(y, x, out=y)

    # theta_ij = dihedral(N_i, CA_i, Cb_i, Cb_j): axis u_i, b0 = N_i - CA_i, b2 = delta_ij.
    b0 = n - ca
    v = b0 - np.sum(b0 * u, axis=-1, keepdims=True) * u
    theta = np.arctan2(project(_cross(u, v)), project(v))

    # phi_ij = angle(CA_i, Cb_i, Cb_j): between -u_i and e_ij.
    a_i *= inv
    np.negative(a_i, out=a_i)
    phi = np.arccos(np.clip(a_i, -1.0, 1.0, out=a_i), out=a_i)

    for angles in (omega, theta, phi):
        angles *= mask
    np.copyto(dist, dmax, where=~mask)
    return SixD(d=dist, omega=omega, theta=theta, phi=phi)
