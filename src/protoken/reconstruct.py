"""Back-conversion: a 6D image -> 3D coordinates (Cb, optionally the full backbone) -> PDB/mmCIF.

The seed's section 4, plus what it leaves out:

1. **Distances** from channel 0's lower triangle, d = (x + 1) / 2 * dmax, symmetric, zero
   diagonal (:func:`protoken.codec.image_to_distances`). A pair whose pixel is at the top of the
   range (d >= dmax, *clipped*) only says "at least dmax apart".
2. **Classical MDS** (:func:`mds`): B = -1/2 J D^2 J, its top three eigenpairs (a partial
   symmetric eigensolver, ARPACK via ``scipy.sparse.linalg.eigsh``), negative eigenvalues set to
   zero, X = V3 sqrt(Lambda3).
3. **Refinement** (:func:`refine_distances`) when pairs are clipped, or more generally when the
   MDS solution misses the image's distances by more than ``REFINE_RMS`` (8-bit quantisation,
   model noise). MDS reads a clipped pair as exactly dmax, which crushes large or extended
   proteins. The coordinates are refined by minimising the stress sum (r_ij - d_ij)^2 over the
   known pairs plus a hinge sum max(0, dmax - r_ij)^2 over the clipped pairs (clipped pairs
   pulled closer than dmax are pushed out, those beyond dmax are free), with scipy's L-BFGS and
   an analytic gradient. This recovers every clipped-pair protein of the test set to the
   image's precision, and lowers the Cb error of 8-bit images by about a quarter.
4. **Handedness** (:func:`resolve_handedness`): distances cannot tell a structure from its
   mirror image; the image's chiral channel can. The CA direction of each residue is placed
   from its phi angles to every known partner (:func:`ca_directions`), the omega dihedrals are
   recomputed from these, and their signs are compared with channel 0's upper triangle: if they
   disagree the coordinates are mirrored. The seed's Procrustes, which allows reflections,
   hides this; here the mirror image is fixed before any comparison, and the metrics never
   allow reflections (:mod:`protoken.metrics`).
5. Optionally the **full backbone** (N, CA, C, O, CB) from the orientation channels
   (:mod:`protoken.backbone`).

The pipeline accepts noisy images (e.g. decoded by a VQ-VAE): values are clipped to [-1, 1],
non-finite pixels are treated as 0, non-Euclidean distances and inconsistent angles degrade the
result but never raise or produce NaN.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from protoken.codec import image_to_features, read_image
from protoken.fileio import format_value, read_fasta, single_threaded
from protoken.geometry import DMAX, SixD

__all__ = [
    "Reconstruction",
    "ca_directions",
    "clipped_mask",
    "compare_with_reference",
    "distance_rms",
    "load_image",
    "mds",
    "reconstruct",
    "refine_distances",
    "resolve_handedness",
    "stress",
    "to_structure_text",
]

#: A pixel of channel 0's lower triangle at or above 1 - CLIP_TOL is a clipped pair (d >= dmax).
#: 16-bit PNGs resolve 3e-5 and 8-bit ones store clipped pairs as exactly 1.
CLIP_TOL = 1e-5

#: ``reconstruct(refine=True)`` refines the MDS solution when its RMS distance violation exceeds
#: this (Angstrom) or any pair is clipped; 16-bit images of real proteins give ~0.0003.
REFINE_RMS = 1e-3


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cross product of (L, 3) arrays (np.cross has a large fixed cost)."""
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    return np.stack((a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0), axis=-1)


# --------------------------------------------------------------------------- result


@dataclass
class Reconstruction:
    """The 3D structure recovered from one image.

    Attributes
    ----------
    cb : ndarray, shape (L, 3)
        C-beta coordinates, Angstrom, centred: the distance stage's solution (MDS, refinement,
        handedness), also with ``backbone=True``, where ``atoms["CB"]`` is instead the virtual Cb
        of the ideal-geometry backbone (within a few hundredths of an Angstrom of ``cb``).
    mirrored_before_fix : bool
        The coordinates had the wrong handedness before :func:`resolve_handedness` mirrored them.
    clipped_pairs : int
        Residue pairs i < j whose distance is clipped in the image (d >= dmax).
    handedness_score : float
        Correlation, in [-1, 1], between sin(omega) of the image and of the returned structure;
        near 1 for a faithful image, near 0 when the omega channel is uninformative (then the
        handedness is a guess).
    refined : bool
        The Cb coordinates were refined by :func:`refine_distances` (``refine=True`` and clipped
        pairs present or MDS off by more than ``REFINE_RMS``).
    distance_rms : float
        RMS violation, Angstrom, of the returned Cb: |r_ij - d_ij| over the known pairs and
        max(0, dmax - r_ij) over the clipped pairs (all pairs i < j).
    distance_rms_mds : float
        The same for the classical-MDS solution (before refinement).
    atoms : dict of str to ndarray (L, 3), or None
        With ``backbone=True``: ``N``, ``CA``, ``C``, ``O``, ``CB`` in that order.
    backbone_info : dict
        With ``backbone=True``: diagnostics of the backbone fit (see
        :func:`protoken.backbone.build_backbone`).
    """

    cb: np.ndarray
    mirrored_before_fix: bool
    clipped_pairs: int
    handedness_score: float = 0.0
    refined: bool = False
    distance_rms: float = 0.0
    distance_rms_mds: float = 0.0
    dmax: float = DMAX
    atoms: dict[str, np.ndarray] | None = None
    backbone_info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cb)

    @property
    def output_atoms(self) -> dict[str, np.ndarray]:
        """The atoms written to structure files: the backbone if present, else ``{"CB": cb}``."""
        return self.atoms if self.atoms is not None else {"CB": self.cb}

    def to_text(self, sequence: str | None = None, fmt: str = "pdb") -> str:
        """PDB or mmCIF text (see :func:`to_structure_text`)."""
        return to_structure_text(self.output_atoms, sequence=sequence, fmt=fmt)


# --------------------------------------------------------------------------- image


def load_image(image_or_path) -> np.ndarray:
    """An image as float64 (3, L, L) in [-1, 1], from a PNG path or an array.

    Arrays may be numpy or torch (CPU or not), with extra leading singleton axes
    (e.g. (1, 3, L, L)). Non-finite values become 0 and everything is clipped to [-1, 1], so
    that noisy model outputs are accepted.

    Raises
    ------
    ValueError
        Not shaped (3, L, L).
    """
    if isinstance(image_or_path, str | os.PathLike):
        image = read_image(image_or_path, dtype=np.float64)
    else:
        image = image_or_path
        if hasattr(image, "detach"):  # a torch tensor
            image = image.detach().cpu().double().numpy()
        image = np.array(image, dtype=np.float64)  # a copy: never modify the caller's array
    while image.ndim > 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2]:
        raise ValueError(f"expected an image of shape (3, L, L), got {image.shape}")
    np.nan_to_num(image, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(image, -1.0, 1.0, out=image)
    return image


def clipped_mask(image: np.ndarray, tol: float = CLIP_TOL) -> np.ndarray:
    """Symmetric (L, L) bool mask of the clipped pairs (channel 0's lower triangle >= 1 - tol);
    the diagonal is False."""
    ch0 = np.asarray(image)[0]
    low = np.tril(ch0 >= 1.0 - tol, k=-1)
    return low | low.T


# --------------------------------------------------------------------------- MDS


def mds(distances) -> np.ndarray:
    """Classical multidimensional scaling into 3D.

    B = -1/2 J D^2 J (J = I - 11^T / L), its three largest eigenpairs by a partial symmetric
    eigensolver (ARPACK's Lanczos, ``scipy.sparse.linalg.eigsh``: a few dozen products B v, so
    L = 1024 takes ~0.05 s; dense LAPACK for L <= 32), negative eigenvalues set to 0,
    X = V3 diag(sqrt(lambda)).

    Parameters
    ----------
    distances : array_like, shape (L, L)
        Distance matrix, Angstrom. Need not be Euclidean; it is symmetrised (averaged with its
        transpose) and non-finite entries count as 0.

    Returns
    -------
    ndarray, shape (L, 3)
        Centred coordinates, axes along decreasing variance. Defined only up to a rotation and
        a reflection; :func:`resolve_handedness` fixes the latter.
    """
    from scipy.linalg import eigh

    d = np.array(distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"expected a square distance matrix, got shape {d.shape}")
    length = len(d)
    out = np.zeros((length, 3))
    if length < 2:
        return out
    np.nan_to_num(d, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    d2 = d * d
    d2 += d2.T
    d2 *= 0.5
    np.fill_diagonal(d2, 0.0)
    # double centring without forming J: B_ij = -1/2 (D2_ij - r_i - r_j + m)
    r = d2.mean(axis=0)
    b = d2
    b -= r[None, :]
    b -= r[:, None]
    b += r.mean()
    b *= -0.5
    k = min(3, length)
    w = v = None
    if length > 32:
        from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh

        # B v by einsum rather than BLAS dgemv: multithreaded dgemv on busy cores (or in
        # several worker processes) is 20x slower than this single-threaded loop
        op = LinearOperator(
            (length, length),
            matvec=lambda x: np.einsum("ij,j->i", b, np.ravel(x)),
            dtype=np.float64,
        )
        # a fixed start vector keeps results reproducible (not constant: J maps 1 to 0)
        v0 = np.random.default_rng(0).standard_normal(length)
        try:
            w, v = eigsh(op, k=k, which="LA", v0=v0)
            order = np.argsort(w)
            w, v = w[order], v[:, order]
        except ArpackError:  # pragma: no cover - no convergence: use the dense solver
            w = v = None
    if w is None:
        from scipy.linalg import eigh

        w, v = eigh(b, subset_by_index=[length - k, length - 1], check_finite=False)
    w, v = w[::-1], v[:, ::-1]
    out[:, :k] = v * np.sqrt(np.maximum(w, 0.0))
    out -= out.mean(axis=0)
    return out


# --------------------------------------------------------------------------- refinement


def _pair_terms(x: np.ndarray) -> np.ndarray:
    """Pairwise distances (L, L) of centred coordinates by the Gram matrix."""
    sq = x @ x.T
    n = sq.diagonal().copy()
    sq *= -2.0
    sq += n[:, None]
    sq += n[None, :]
    np.maximum(sq, 0.0, out=sq)
    np.fill_diagonal(sq, 0.0)
    return np.sqrt(sq, out=sq)


def _residuals(r: np.ndarray, d: np.ndarray, clip_idx: np.ndarray, dmax: float) -> np.ndarray:
    """r - d on known pairs, min(r - dmax, 0) on the clipped ones (flat indices ``clip_idx``);
    zero diagonal."""
    res = r - d
    if len(clip_idx):
        res.flat[clip_idx] = np.minimum(r.flat[clip_idx] - dmax, 0.0)
    np.fill_diagonal(res, 0.0)
    return res


def _clip_index(clipped, shape) -> np.ndarray:
    if clipped is None:
        return np.zeros(0, dtype=np.intp)
    clipped = np.asarray(clipped)
    if clipped.shape != shape:
        raise ValueError(f"clipped mask has shape {clipped.shape}, distances {shape}")
    return np.flatnonzero(clipped)


def distance_rms(x, distances, clipped=None, dmax: float = DMAX) -> float:
    """RMS distance violation of coordinates x (L, 3) against an image's distances: |r - d| on
    known pairs, max(0, dmax - r) on clipped pairs (bool mask ``clipped``), over all pairs i < j
    (Angstrom)."""
    x = np.asarray(x, dtype=np.float64)
    length = len(x)
    if length < 2:
        return 0.0
    d = np.asarray(distances, dtype=np.float64)
    res = _residuals(_pair_terms(x - x.mean(axis=0)), d, _clip_index(clipped, d.shape), dmax)
    return float(np.sqrt(np.einsum("ij,ij->", res, res) / (length * (length - 1))))


def _stress(x: np.ndarray, d: np.ndarray, clip_idx: np.ndarray, dmax: float):
    length = len(x)
    norm = 1.0 / max(length * (length - 1), 1)
    x = x - x.mean(axis=0)
    r = _pair_terms(x)
    res = _residuals(r, d, clip_idx, dmax)
    f = 0.5 * norm * float(np.einsum("ij,ij->", res, res))
    # d/dx_i of sum_{i<j} res_ij^2 is sum_j 2 res_ij (x_i - x_j) / r_ij (res_ii = 0)
    np.maximum(r, 1e-9, out=r)
    g = np.divide(res, r, out=r)
    grad = g @ x
    grad -= g.sum(axis=1)[:, None] * x
    grad *= -2.0 * norm
    return f, grad.ravel()


def stress(x, distances, clipped=None, dmax: float = DMAX) -> tuple[float, np.ndarray]:
    """The objective of :func:`refine_distances` and its gradient.

    f = (sum_{i<j known} (r_ij - d_ij)^2 + sum_{i<j clipped} max(0, dmax - r_ij)^2) / (L(L-1))
    (half the mean squared violation over ordered pairs); grad flattened to (L * 3,).
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1, 3)
    d = np.asarray(distances, dtype=np.float64)
    return _stress(x, d, _clip_index(clipped, d.shape), dmax)


def refine_distances(
    x0,
    distances,
    clipped,
    dmax: float = DMAX,
    max_iter: int = 1000,
    tol: float = 1e-10,
) -> np.ndarray:
    """Refine coordinates against known distances, keeping clipped pairs at least dmax apart.

    Minimises, with scipy's L-BFGS-B and an analytic gradient,

        f(X) = sum_{i<j known} (r_ij - d_ij)^2 + sum_{i<j clipped} max(0, dmax - r_ij)^2

    where r_ij = |x_i - x_j|. Each evaluation is a handful of (L, L) array operations
    (~10 ms at L = 1024). Reflection-equivariant: the handedness of ``x0`` is kept.

    Parameters
    ----------
    x0 : array_like, shape (L, 3)
        Start, e.g. the :func:`mds` solution.
    distances : array_like, shape (L, L)
        Target distances (symmetric); values on clipped pairs are ignored.
    clipped : array_like of bool, shape (L, L)
        Symmetric mask of the clipped pairs.
    max_iter : int
        L-BFGS iteration limit.
    tol : float
        L-BFGS stops when an iteration lowers f (the mean squared violation, Angstrom^2) by
        less than ``tol`` (scipy's ``ftol``; relative once f > 1).

    Returns
    -------
    ndarray, shape (L, 3)
        Centred refined coordinates (``x0`` itself, centred, if nothing could be improved).
    """
    from scipy.optimize import minimize

    x0 = np.asarray(x0, dtype=np.float64)
    x0 = x0 - x0.mean(axis=0)
    length = len(x0)
    if length < 3:
        return x0
    d = np.asarray(distances, dtype=np.float64)
    clip_idx = _clip_index(clipped, d.shape)

    def fun(flat):
        return _stress(flat.reshape(length, 3), d, clip_idx, dmax)

    f0, _ = fun(x0.ravel())
    if not np.isfinite(f0):
        return x0
    result = minimize(
        fun,
        x0.ravel(),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "ftol": tol, "gtol": 1e-9, "maxcor": 20},
    )
    x = result.x.reshape(length, 3)
    if not (np.isfinite(x).all() and np.isfinite(result.fun)) or result.fun > f0:
        return x0
    return x - x.mean(axis=0)


# --------------------------------------------------------------------------- handedness


def ca_directions(cb, phi, mask) -> np.ndarray:
    """Unit vectors from each Cb to its CA, placed from the phi angles.

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
    r = _pair_terms(cb)
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


def omega_from_directions(cb: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos)-proportional parts (y, x) of omega_ij = dihedral(CA_i, Cb_i, Cb_j, CA_j) from
    Cb and the unit vectors u = (Cb - CA) / |Cb - CA|: omega = atan2(y, x) with
    y = e . (u_i x u_j), x = u_i . u_j - (u_i . e)(u_j . e), e = (Cb_j - Cb_i) / d_ij."""
    r = _pair_terms(cb)
    inv = np.divide(1.0, r, out=np.zeros_like(r), where=r > 1e-9)
    y = u @ _cross(u, cb).T
    y -= _cross(cb, u) @ u.T
    y *= inv
    ui_e = (u @ cb.T - np.einsum("ik,ik->i", u, cb)[:, None]) * inv  # u_i . e_ij
    uj_e = (np.einsum("ik,ik->i", u, cb)[None, :] - cb @ u.T) * inv  # u_j . e_ij
    x = u @ u.T - ui_e * uj_e
    return y, x


def handedness_score(cb, features: SixD, mask) -> float:
    """Correlation in [-1, 1] between sin(omega) of the image and of the structure ``cb``
    with CA directions placed from phi (:func:`ca_directions`); the mirror image scores the
    negative. Pairs outside ``mask`` are ignored."""
    cb = np.asarray(cb, dtype=np.float64)
    cb = cb - cb.mean(axis=0)
    if len(cb) < 4:
        return 0.0
    m = np.asarray(mask, dtype=bool)
    u = -ca_directions(cb, features.phi, m)
    y, x = omega_from_directions(cb, u)
    s_rec = np.divide(y, np.hypot(x, y), out=np.zeros_like(y), where=np.hypot(x, y) > 1e-12)
    s_img = np.sin(features.omega)
    num = float(np.sum(s_img * s_rec, where=m))
    den = float(np.sqrt(np.sum(s_img * s_img, where=m) * np.sum(s_rec * s_rec, where=m)))
    return num / den if den > 1e-12 and np.isfinite(num) else 0.0


def resolve_handedness(cb, features: SixD, mask) -> tuple[np.ndarray, bool, float]:
    """Return ``cb`` with the handedness the image's omega channel asks for.

    Parameters
    ----------
    cb : array_like, shape (L, 3)
        Coordinates of either handedness (e.g. from :func:`mds`).
    features : SixD
        The image's features (omega and phi are used).
    mask : array_like of bool, shape (L, L)
        Pairs whose angles are meaningful (known distances, i != j).

    Returns
    -------
    cb : ndarray, shape (L, 3)
        Centred coordinates, mirrored (z -> -z) if needed.
    mirrored : bool
        Whether the input had the wrong handedness.
    score : float
        :func:`handedness_score` of the returned coordinates (>= 0).
    """
    cb = np.asarray(cb, dtype=np.float64)
    cb = cb - cb.mean(axis=0)
    score = handedness_score(cb, features, mask)
    if score < 0:
        return cb * np.array([1.0, 1.0, -1.0]), True, -score
    return cb, False, score


# --------------------------------------------------------------------------- pipeline


def reconstruct(
    image_or_path,
    dmax: float = DMAX,
    refine: bool = True,
    backbone: bool = False,
) -> Reconstruction:
    """Recover 3D coordinates from a 6D image.

    Parameters
    ----------
    image_or_path : str, PathLike or array_like (3, L, L)
        A protoken/seed PNG (8 or 16 bit) or an image in [-1, 1] (numpy or torch; noisy model
        outputs are fine, see :func:`load_image`).
    dmax : float
        The distance cut-off the image was made with, Angstrom.
    refine : bool
        Refine the MDS solution (:func:`refine_distances`) when any pair is clipped or its RMS
        distance violation exceeds ``REFINE_RMS`` (as for 8-bit or model-decoded images).
        False: classical MDS only.
    backbone : bool
        Also build N, CA, C, O from the orientation channels and refine all atoms
        (:func:`protoken.backbone.build_backbone`); ``atoms`` is then set.

    Returns
    -------
    Reconstruction
    """
    image = load_image(image_or_path)
    features = image_to_features(image, dmax)
    d = features.d
    clipped = clipped_mask(image)
    known = ~clipped
    np.fill_diagonal(known, False)
    n_clipped = int(np.count_nonzero(clipped) // 2)

    x = mds(d)
    rms_mds = distance_rms(x, d, clipped, dmax)
    refined = bool(refine and (n_clipped or rms_mds > REFINE_RMS))
    rms = rms_mds
    if refined:
        x = refine_distances(x, d, clipped, dmax)
        rms = distance_rms(x, d, clipped, dmax)
    x, mirrored, score = resolve_handedness(x, features, known)
    rec = Reconstruction(
        cb=x,
        mirrored_before_fix=mirrored,
        clipped_pairs=n_clipped,
        handedness_score=score,
        refined=refined,
        distance_rms=rms,
        distance_rms_mds=rms_mds,
        dmax=dmax,
    )
    if backbone:
        from protoken.backbone import build_backbone

        atoms, info = build_backbone(x, features, known, cb_error=rms)
        rec.atoms = atoms
        rec.backbone_info = info
    return rec


# --------------------------------------------------------------------------- output


def to_structure_text(
    atoms, sequence: str | None = None, fmt: str = "pdb", chain_id: str = "A"
) -> str:
    """Coordinates -> PDB or mmCIF text, residues numbered 1..L in image order.

    Parameters
    ----------
    atoms : ndarray (L, 3), dict of str to ndarray (L, 3), or Reconstruction
        A bare array is written as one CB atom per residue.
    sequence : str, optional
        One-letter sequence of length L (residue names); else every residue is UNK.
    fmt : {"pdb", "cif"}
    """
    from protoken.structure import structure_to_text

    if isinstance(atoms, Reconstruction):
        atoms = atoms.output_atoms
    elif not isinstance(atoms, dict):
        atoms = {"CB": np.asarray(atoms, dtype=np.float64)}
    return structure_to_text(atoms, sequence=sequence or None, fmt=fmt, chain_id=chain_id)


# --------------------------------------------------------------------------- metrics


def _reference_atoms(reference) -> dict[str, np.ndarray]:
    """Atoms of a reference: a Backbone, a structure file path or an (L, 3, 3) N/CA/C array give
    N, CA, C and their virtual CB; an (L, 3) array is taken as CB only."""
    from protoken.geometry import virtual_cb

    if isinstance(reference, str | os.PathLike):
        from protoken.structure import read_backbones

        reference = read_backbones(reference, chains="first", models="first")[0]
    coords = getattr(reference, "coords", reference)
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim == 2 and coords.shape[1] == 3:
        return {"CB": coords}
    if coords.ndim != 3 or coords.shape[1:] != (3, 3):
        raise ValueError(
            f"reference: expected N/CA/C (L, 3, 3) or CB (L, 3) coordinates, got {coords.shape}"
        )
    n, ca, c = coords[:, 0], coords[:, 1], coords[:, 2]
    return {"N": n, "CA": ca, "C": c, "CB": virtual_cb(n, ca, c)}


def compare_with_reference(rec: Reconstruction, reference) -> dict:
    """Metrics of a reconstruction against the structure its image was made from.

    Parameters
    ----------
    rec : Reconstruction
    reference : Backbone, str/PathLike (structure file; first chain, first model), array
        (L, 3, 3) of N, CA, C, or array (L, 3) of Cb
        The reference Cb is the seed's virtual Cb of its N, CA, C. A Cb-only reference gives
        the Cb metrics only.

    Returns
    -------
    dict
        ``length``; ``cb_rmsd`` (Angstrom, after superposition by a proper rotation),
        ``tm_score`` (on Cb, fixed correspondence, :func:`protoken.metrics.tm_score`),
        ``lddt`` (on Cb), ``clipped_pairs``, ``mirrored_before_fix``, ``handedness_score``,
        ``distance_rms``, and ``mirror_image`` (True if the reconstruction superposes better
        onto the reference after a reflection: the check that the handedness is right). With a
        backbone also ``bb_rmsd`` (N, CA, C superposed together), ``ca_rmsd`` and
        ``ca_tm_score`` (when the reference has N, CA, C).

    Raises
    ------
    ValueError
        The reference has a different number of residues.
    """
    from protoken.metrics import lddt, mirror_rmsd, rmsd, tm_score

    ref = _reference_atoms(reference)
    length = len(ref["CB"])
    if length != len(rec.cb):
        raise ValueError(f"reference has {length} residues, the reconstruction {len(rec.cb)}")
    cb_rmsd = rmsd(rec.cb, ref["CB"])
    out = {
        "length": length,
        "cb_rmsd": cb_rmsd,
        "tm_score": tm_score(rec.cb, ref["CB"]),
        "lddt": lddt(rec.cb, ref["CB"]),
        "clipped_pairs": rec.clipped_pairs,
        "mirrored_before_fix": rec.mirrored_before_fix,
        "mirror_image": bool(length >= 4 and mirror_rmsd(rec.cb, ref["CB"]) < cb_rmsd),
        "handedness_score": rec.handedness_score,
        "distance_rms": rec.distance_rms,
    }
    if rec.atoms is not None and "N" in ref:
        names = ("N", "CA", "C")
        mine = np.concatenate([rec.atoms[k] for k in names])
        theirs = np.concatenate([ref[k] for k in names])
        out["bb_rmsd"] = rmsd(mine, theirs)
        out["ca_rmsd"] = rmsd(rec.atoms["CA"], ref["CA"])
        out["ca_tm_score"] = tm_score(rec.atoms["CA"], ref["CA"])
    return out


# --------------------------------------------------------------------------- CLI

METRICS_COLUMNS = (
    "id",
    "length",
    "cb_rmsd",
    "tm_score",
    "lddt",
    "clipped_pairs",
    "mirrored_before_fix",
    "mirror_image",
    "handedness_score",
    "distance_rms",
)
BACKBONE_COLUMNS = ("bb_rmsd", "ca_rmsd", "ca_tm_score")


def image_id(path: str | os.PathLike) -> str:
    """The id of an image file: its name without ``.png``."""
    name = os.path.basename(os.fspath(path))
    return name[:-4] if name.lower().endswith(".png") else name


class _Sequences:
    """``--fasta``: one FASTA file (records matched by id; a single record also serves a single
    image of any id) or a folder of ID.fasta files."""

    def __init__(self, path: str | None, n_images: int):
        self.path = path
        self.records: dict[str, str] = {}
        self.single = None
        if path and os.path.isfile(path):
            self.records = read_fasta(path)
            if len(self.records) == 1 and n_images == 1:
                self.single = next(iter(self.records.values()))

    def get(self, sid: str) -> str | None:
        if not self.path:
            return None
        if os.path.isdir(self.path):
            for ext in (".fasta", ".fa", ".faa"):
                fasta = os.path.join(self.path, sid + ext)
                if os.path.isfile(fasta):
                    return next(iter(read_fasta(fasta).values()), None)
            return None
        return self.records.get(sid, self.single)


def _reference_index(path: str | None) -> dict[str, str]:
    """``--reference``: structure id -> file (a file, or a folder walked recursively; of several
    files with one id the first in sorted path order is used)."""
    if not path:
        return {}
    from protoken.convert import STRUCTURE_SUFFIXES
    from protoken.fileio import walk_files
    from protoken.structure import structure_id

    index: dict[str, str] = {}
    if os.path.isfile(path):
        return {structure_id(path): path}
    for f in sorted(walk_files(path, STRUCTURE_SUFFIXES)):
        index.setdefault(structure_id(f), f)
    return index


def _find_reference(sid: str, index: dict[str, str]):
    """The reference Backbone of image ``sid``: file ID.*, or chain CHAIN of STEM.* for the ids
    ``STEM_CHAIN`` that ``protoken convert --chains split`` makes. None if absent."""
    from protoken.structure import read_backbones

    if sid in index:
        return read_backbones(index[sid], chains="first", models="first")[0]
    stem, _, chain = sid.rpartition("_")
    if stem in index and chain:
        for bb in read_backbones(index[stem], chains="split", models="first"):
            if bb.id == sid:
                return bb
    return None


@dataclass
class _Task:
    image: str
    out: str
    fmt: str
    dmax: float
    refine: bool
    backbone: bool
    sequence: str | None
    reference_index: dict[str, str]


def _run_one(task: _Task) -> dict:
    """Reconstruct one image, write its structure, compare with its reference if any."""
    sid = image_id(task.image)
    row: dict = {"id": sid}
    try:
        t0 = time.perf_counter()
        rec = reconstruct(task.image, dmax=task.dmax, refine=task.refine, backbone=task.backbone)
        row["seconds"] = time.perf_counter() - t0
        seq = task.sequence
        note = ""
        if seq is not None and len(seq) != len(rec):
            note = f"sequence has {len(seq)} residues, image {len(rec)}: residues written as UNK"
            seq = None
        from protoken.fileio import atomic_write

        path = os.path.join(task.out, f"{sid}.{task.fmt}")
        atomic_write(path, rec.to_text(sequence=seq, fmt=task.fmt))
        row.update(length=len(rec), clipped_pairs=rec.clipped_pairs, note=note)
        row["mirrored_before_fix"] = rec.mirrored_before_fix
        if task.reference_index:
            ref = _find_reference(sid, task.reference_index)
            if ref is None:
                row["note"] = (note + "; " if note else "") + "no reference"
            else:
                row.update(compare_with_reference(rec, ref))
                row["has_reference"] = True
    except Exception as exc:  # noqa: BLE001 - one bad input must not stop a batch
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def summarize(rows: list[dict]) -> dict:
    """Summary statistics of metric rows (those compared with a reference)."""
    scored = [r for r in rows if r.get("has_reference")]
    out: dict = {
        "images": len(rows),
        "failed": sum("error" in r for r in rows),
        "with_reference": len(scored),
    }
    if not scored:
        return out
    for key in ("cb_rmsd", "tm_score", "lddt", *BACKBONE_COLUMNS):
        vals = np.array([r[key] for r in scored if key in r], dtype=np.float64)
        if len(vals):
            out[key] = {
                "median": float(np.median(vals)),
                "mean": float(vals.mean()),
                "min": float(vals.min()),
                "max": float(vals.max()),
            }
    out["mirror_images"] = sum(bool(r["mirror_image"]) for r in scored)
    out["mirrored_before_fix"] = sum(bool(r["mirrored_before_fix"]) for r in scored)
    clipped = [r for r in scored if r["clipped_pairs"]]
    out["clipped_proteins"] = [
        {k: r[k] for k in ("id", "length", "clipped_pairs", "cb_rmsd", "tm_score")} for r in clipped
    ]
    return out


def summary_line(summary: dict) -> str:
    """One line for the terminal."""
    text = f"reconstructed {summary['images'] - summary['failed']} of {summary['images']} images"
    if not summary.get("with_reference"):
        return text
    cb, tm, ld = summary["cb_rmsd"], summary["tm_score"], summary["lddt"]
    text += (
        f"; vs reference ({summary['with_reference']}): Cb RMSD median {cb['median']:.4f} A"
        f" (max {cb['max']:.4f}), TM-score median {tm['median']:.4f} (min {tm['min']:.4f}),"
        f" lDDT median {ld['median']:.4f}; mirror images {summary['mirror_images']}"
    )
    if "bb_rmsd" in summary:
        text += (
            f"; backbone RMSD median {summary['bb_rmsd']['median']:.4f} A"
            f", CA TM-score median {summary['ca_tm_score']['median']:.4f}"
        )
    clipped = summary["clipped_proteins"]
    if clipped:
        worst = max(r["cb_rmsd"] for r in clipped)
        text += f"; {len(clipped)} with clipped pairs (max Cb RMSD {worst:.4f} A)"
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_DIR", help="PNG images or folders (recursive)"
    )
    parser.add_argument("--out", "-o", required=True, help="output folder (DIR/ID.pdb)")
    parser.add_argument(
        "--fasta", metavar="FILE_OR_DIR", help="sequences: a FASTA file or a folder of ID.fasta"
    )
    parser.add_argument(
        "--reference",
        metavar="STRUCTURE_OR_DIR",
        help="reference structures matched by id; writes DIR/metrics.tsv and DIR/summary.json",
    )
    parser.add_argument(
        "--dmax", type=float, default=DMAX, help="distance cut-off of the images (default 80)"
    )
    parser.add_argument(
        "--backbone", action="store_true", help="full backbone N, CA, C, O, CB (default: CB only)"
    )
    parser.add_argument("--format", choices=["pdb", "cif"], default="pdb", help="output format")
    parser.add_argument(
        "--no-refine", action="store_true", help="classical MDS only (no distance refinement)"
    )
    parser.add_argument("--workers", "-j", type=int, default=1, help="processes (default 1)")


def _discover_images(inputs: list[str]) -> list[str]:
    from protoken.fileio import walk_files

    images: list[str] = []
    for item in inputs:
        if not os.path.exists(item):
            raise FileNotFoundError(f"no such file or folder: {item}")
        images.extend(walk_files(item, (".png",)))
    return images


def run(args: argparse.Namespace) -> int:
    try:
        images = _discover_images(args.inputs)
    except FileNotFoundError as exc:
        print(f"protoken reconstruct: {exc}", file=sys.stderr)
        return 2
    if not images:
        print("protoken reconstruct: no .png images found", file=sys.stderr)
        return 2
    for opt in ("fasta", "reference"):
        value = getattr(args, opt)
        if value and not os.path.exists(value):
            print(
                f"protoken reconstruct: --{opt}: no such file or folder: {value}", file=sys.stderr
            )
            return 2
    os.makedirs(args.out, exist_ok=True)
    seqs = _Sequences(args.fasta, len(images))
    index = _reference_index(args.reference)
    tasks = [
        _Task(
            image=img,
            out=args.out,
            fmt=args.format,
            dmax=args.dmax,
            refine=not args.no_refine,
            backbone=args.backbone,
            sequence=seqs.get(image_id(img)),
            reference_index=index,
        )
        for img in images
    ]
    if args.workers > 1 and len(tasks) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.workers, initializer=single_threaded) as pool:
            rows = list(pool.map(_run_one, tasks, chunksize=1))
    else:
        rows = [_run_one(t) for t in tasks]
    for row in rows:
        if "error" in row:
            print(f"{row['id']}: failed: {row['error']}", file=sys.stderr)
        elif row.get("note"):
            print(f"{row['id']}: {row['note']}", file=sys.stderr)
    summary = summarize(rows)
    if args.reference:
        import json

        from protoken.fileio import atomic_write

        columns = METRICS_COLUMNS + (BACKBONE_COLUMNS if args.backbone else ())
        lines = ["\t".join(columns)]
        for row in rows:
            if row.get("has_reference"):
                lines.append("\t".join(format_value(row.get(c, "")) for c in columns))
        atomic_write(os.path.join(args.out, "metrics.tsv"), "\n".join(lines) + "\n")
        atomic_write(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    print(summary_line(summary))
    return 1 if summary["failed"] else 0
