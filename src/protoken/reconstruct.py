"""Back-conversion: a 6D image -> 3D coordinates (Cb, optionally the full backbone) -> PDB/mmCIF.

The reference design's section 4, plus what it leaves out:

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
4. **Handedness** (:func:`resolve_handedness`): distances cannot tell a structure from its mirror
   image; the image's chiral channel can. The CA direction of each residue is placed from its phi
   angles to every known partner (:func:`protoken.geometry.ca_directions`), the omega dihedrals are
   recomputed from these, and their signs are compared with channel 0's upper triangle: if they
   disagree the coordinates are mirrored. The reference design's Procrustes, which allows
   reflections, hides this; here the mirror image is fixed before any comparison, and the metrics
   never allow reflections (:mod:`protoken.metrics`).
5. Optionally the **full backbone** (N, CA, C, O, CB) from the orientation channels
   (:mod:`protoken.backbone`).

The pipeline accepts noisy images (e.g. decoded by a VQ-VAE): values are clipped to [-1, 1],
non-finite pixels are treated as 0, non-Euclidean distances and inconsistent angles degrade the
result but never raise or produce NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from protoken.backbone import build_backbone
from protoken.codec import image_to_features, read_image
from protoken.geometry import DMAX, SixD, ca_directions, omega_parts, pairwise_distances
from protoken.structure import structure_to_text

__all__ = [
    "Reconstruction",
    "clipped_mask",
    "distance_rms",
    "handedness_score",
    "load_image",
    "mds",
    "reconstruct",
    "refine_distances",
    "resolve_handedness",
    "stress",
]

#: A pixel of channel 0's lower triangle at or above 1 - CLIP_TOL is a clipped pair (d >= dmax).
#: 16-bit PNGs resolve 3e-5 and 8-bit ones store clipped pairs as exactly 1.
CLIP_TOL = 1e-5

#: ``reconstruct(refine=True)`` refines the MDS solution when its RMS distance violation exceeds
#: this (Angstrom) or any pair is clipped; 16-bit images of real proteins give ~0.0003.
REFINE_RMS = 1e-3


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
        """PDB or mmCIF text of :attr:`output_atoms`, residues numbered 1..L in image order
        (:func:`protoken.structure.structure_to_text`)."""
        return structure_to_text(self.output_atoms, sequence=sequence, fmt=fmt)


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
    res = _residuals(pairwise_distances(x), d, _clip_index(clipped, d.shape), dmax)
    return float(np.sqrt(np.einsum("ij,ij->", res, res) / (length * (length - 1))))


def _stress(x: np.ndarray, d: np.ndarray, clip_idx: np.ndarray, dmax: float):
    length = len(x)
    norm = 1.0 / max(length * (length - 1), 1)
    x = x - x.mean(axis=0)
    r = pairwise_distances(x)
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


def handedness_score(cb, features: SixD, mask) -> float:
    """Correlation in [-1, 1] between sin(omega) of the image and of the structure ``cb`` with CA
    directions placed from phi (:func:`protoken.geometry.ca_directions`); the mirror image scores
    the negative. Pairs outside ``mask`` are ignored."""
    cb = np.asarray(cb, dtype=np.float64)
    cb = cb - cb.mean(axis=0)
    if len(cb) < 4:
        return 0.0
    m = np.asarray(mask, dtype=bool)
    u = -ca_directions(cb, features.phi, m)
    r = pairwise_distances(cb)
    y, x = omega_parts(cb, u, np.divide(1.0, r, out=np.zeros_like(r), where=r > 1e-9))
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
        A PNG of protoken or the reference design (8 or 16 bit) or an image in [-1, 1] (numpy or
        torch; noisy model outputs are fine, see :func:`load_image`).
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
        atoms, info = build_backbone(x, features, known, cb_error=rms)
        rec.atoms = atoms
        rec.backbone_info = info
    return rec
