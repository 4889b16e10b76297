"""Back-conversion: a 6D image -> 3D coordinates (Cb, optionally the full backbone) -> PDB/mmCIF.

The reference design's section 4, plus what it leaves out:

1. **Distances** from channel 0's lower triangle, d = (x + 1) / 2 * dmax, symmetric, zero
   diagonal (:func:`protoken.codec.image_to_distances`). A pair whose pixel is at the top of the
   range (d >= dmax, *clipped*) only says "at least dmax apart".
2. **Classical MDS** (:func:`mds`): B = -1/2 J D^2 J, its top three eigenpairs (a partial
   symmetric eigensolver, ARPACK via ``scipy.sparse.linalg.eigsh``), negative eigenvalues set to
   zero, X = V3 sqrt(Lambda3). With clipped pairs, MDS would read each as exactly dmax, which
   crushes extended proteins (a rod comes back bent, a far domain folded back, at TM 0.5-0.9);
   instead the clipped entries are first filled with shortest paths through the known distances
   (:func:`fill_clipped`, as Isomap), which for chains that reach beyond dmax are within about
   1 % of the true distances.
3. **Refinement** (:func:`refine_distances`) when pairs are clipped, or more generally when the
   MDS solution misses the image's distances by more than ``REFINE_RMS`` (8-bit quantisation,
   model noise). The coordinates are refined by minimising the stress sum (r_ij - d_ij)^2 over
   the known pairs plus a hinge sum max(0, dmax - r_ij)^2 over the clipped pairs (clipped pairs
   pulled closer than dmax are pushed out, those beyond dmax are free), with scipy's L-BFGS and
   an analytic gradient. From the filled start this recovers every clipped-pair protein of the
   test set (``benchmarks/reconstruct.py --clipped``) to the image's precision; it lowers the
   Cb error of 8-bit images by about a quarter. (Measured there too: the plain-MDS start never
   reached a lower stress, and stress majorization, SMACOF with zero weight on clipped pairs,
   was slower and worse before the same refinement; neither is used.)
4. **Handedness** (:func:`resolve_handedness`): distances cannot tell a structure from its mirror
   image; the image's signed angles can. The CA direction of each residue is placed from its phi
   angles to every known partner (:func:`protoken.geometry.ca_directions`), the omega dihedrals
   are recomputed from these and compared with channel 0's upper triangle, and theta is checked
   for which hand places every residue's N consistently (:func:`handedness_evidence`); the
   coordinates are mirrored if the evidence says so (:func:`handedness_confidence`). With
   clipped pairs the protein is also cut into rigid parts inside which every distance is known
   (:func:`rigid_parts`), each part's own angles are asked (the weakest part's answer is the
   reported confidence), and a stretch of the chain whose own hand disagrees with the rest (a
   local minimum of the refinement: part of a long helix, a domain beyond a linker) is mirrored
   back in place (:func:`resolve_part_handedness`). The reference
   design's Procrustes, which allows reflections, hides all this; here the mirror image is fixed
   before any comparison, and the metrics never allow reflections (:mod:`protoken.metrics`).
5. Optionally the **full backbone** (N, CA, C, O, CB) from the orientation channels
   (:mod:`protoken.backbone`).

The pipeline accepts noisy images (e.g. decoded by a VQ-VAE): values are clipped to [-1, 1],
non-finite pixels are treated as 0, non-Euclidean distances and inconsistent angles degrade the
result but never raise or produce NaN.

One module of ~900 lines on purpose: the way back from an image is one pipeline (MDS, clipped
pairs by shortest paths, refinement, handedness per rigid part); split, each part would need
the others' intermediate arrays and thresholds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from protoken.backbone import build_backbone
from protoken.codec import image_to_features, read_image
from protoken.geometry import (
    DMAX,
    SixD,
    ca_directions,
    cross,
    omega_parts,
    pairwise_distances,
)
from protoken.structure import structure_to_text

__all__ = [
    "Reconstruction",
    "clipped_mask",
    "distance_rms",
    "fill_clipped",
    "handedness_confidence",
    "handedness_evidence",
    "handedness_score",
    "load_image",
    "mds",
    "part_scores",
    "reconstruct",
    "refine_distances",
    "resolve_handedness",
    "resolve_part_handedness",
    "residue_handedness",
    "rigid_parts",
    "stress",
]

#: A pixel of channel 0's lower triangle at or above 1 - CLIP_TOL is a clipped pair (d >= dmax).
#: 16-bit PNGs resolve 3e-5 and 8-bit ones store clipped pairs as exactly 1.
CLIP_TOL = 1e-5

#: Below this :attr:`Reconstruction.handedness_confidence` the hand is called undetermined: no
#: pair carries a signed angle (score 0), or the image's angles barely prefer one hand (a decoded
#: image that lost its angles).
HANDEDNESS_MIN = 0.1

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
        Correlation, in [-1, 1], between sin(omega) of the image and of the returned structure
        (:func:`handedness_score`); 1 for an exact image, near 0 when the omega channel is
        uninformative (as in many decoded images, whose hand theta then decides).
    handedness_confidence : float
        The evidence for the returned hand from every known pair's signed angles, omega and theta
        (:func:`handedness_confidence`; 0.7-0.9 for exact images); with clipped pairs the weakest
        rigid part's (:func:`part_scores`). Below :data:`HANDEDNESS_MIN` the hand is a guess:
        :attr:`handedness` is then ``"undetermined"``.
    rigid_parts : int
        Parts inside which every distance is known (:func:`rigid_parts`); 1 without clipped
        pairs.
    mirrored_parts : int
        Stretches of the chain whose own angles asked for the other hand and that were
        mirrored back (:func:`resolve_part_handedness`).
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
    handedness_confidence: float = 0.0
    rigid_parts: int = 1
    mirrored_parts: int = 0
    refined: bool = False
    distance_rms: float = 0.0
    distance_rms_mds: float = 0.0
    dmax: float = DMAX
    atoms: dict[str, np.ndarray] | None = None
    backbone_info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cb)

    @property
    def handedness(self) -> str:
        """``"determined"`` when the image's signed angles decide the hand of every rigid part
        (:attr:`handedness_confidence` >= :data:`HANDEDNESS_MIN`), else ``"undetermined"``."""
        return "determined" if self.handedness_confidence >= HANDEDNESS_MIN else "undetermined"

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


#: Two residues' Cb are never closer than this, Angstrom: in the shortest paths of
#: :func:`fill_clipped` a known distance counts at least this much, so that a noisy image's
#: too-short distance cannot short-circuit the chain.
MIN_SEPARATION = 3.0


def fill_clipped(distances, clipped, dmax: float = DMAX) -> np.ndarray:
    """Estimates of the clipped distances from the known ones: shortest paths (as Isomap).

    A clipped pair only says d_ij >= dmax; classical MDS reading it as dmax crushes extended
    proteins (a rod comes back bent, far domains folded onto each other). The graph whose edges
    are the known pairs, each as long as its distance (at least :data:`MIN_SEPARATION`), holds
    a path from i to j along the chain or through the fold; by the triangle inequality the
    shortest one is at least d_ij, and for extended chains (rods, linkers, tails) it is close
    to it (within 1 % on the median of the test set in ``benchmarks/reconstruct.py
    --clipped``). Each clipped entry becomes max(dmax, path); pairs with no path (a chain
    broken by a gap wider than dmax) get the largest filled value.

    ``scipy.sparse.csgraph.shortest_path`` by Floyd-Warshall: the graph is dense (every known
    pair is an edge), where it is several times faster than Dijkstra (0.6 s against 3.5 s at
    L = 1024).

    Parameters
    ----------
    distances : array_like, shape (L, L)
        The image's distances (symmetric), Angstrom.
    clipped : array_like of bool, shape (L, L)
        Symmetric mask of the clipped pairs.
    dmax : float
        The image's cut-off, Angstrom.

    Returns
    -------
    ndarray, shape (L, L)
        ``distances`` with the clipped entries filled; zero diagonal.
    """
    from scipy.sparse.csgraph import shortest_path

    d = np.array(distances, dtype=np.float64)
    np.nan_to_num(d, copy=False, nan=dmax, posinf=dmax, neginf=0.0)
    clipped = np.asarray(clipped, dtype=bool)
    # a dense input: 0 means "no edge", so every known pair must be > 0 (MIN_SEPARATION)
    graph = np.where(clipped, 0.0, np.maximum(d, MIN_SEPARATION))
    np.fill_diagonal(graph, 0.0)
    paths = shortest_path(graph, method="FW", directed=False)
    unreachable = ~np.isfinite(paths)
    if unreachable.any():
        reach = paths[~unreachable]
        paths[unreachable] = max(dmax, float(reach.max()) if reach.size else dmax)
    out = np.where(clipped, np.maximum(paths, dmax), d)
    np.fill_diagonal(out, 0.0)
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


def handedness_evidence(cb, features: SixD, mask) -> dict[str, np.ndarray]:
    """Per-residue evidence for the hand of ``cb``, from every pair in ``mask`` whose angles are
    signed (omega and theta; phi is not, and places the CA directions).

    - omega: with CA directions placed from phi (:func:`protoken.geometry.ca_directions`),
      omega_ij of the structure is recomputed; ``omega_num[i]`` = sum_j sin(omega_image) *
      sin(omega_structure), ``omega_img[i]`` and ``omega_rec[i]`` the sums of their squares
      (a correlation once summed over residues).
    - theta: theta_ij places N_i about the CA-Cb axis (:func:`protoken.backbone.azimuth_sums`);
      with the right hand every partner j points to the same N direction, with the other the
      directions scatter. ``theta_num[i]`` = |sum for this hand| - |sum for the other|,
      ``theta_den[i]`` = the largest possible sum (every partner agreeing), so the ratio is in
      [-1, 1].

    Every term changes sign under a reflection of ``cb``.

    Parameters
    ----------
    cb : array_like, shape (L, 3)
    features : SixD
        The image's features (omega, theta and phi are used).
    mask : array_like of bool, shape (L, L)
        Pairs to use (known distances, i != j).

    Returns
    -------
    dict of str to ndarray (L,)
        ``omega_num``, ``omega_img``, ``omega_rec``, ``theta_num``, ``theta_den``.
    """
    from protoken.backbone import azimuth_sums

    cb = np.asarray(cb, dtype=np.float64)
    cb = cb - cb.mean(axis=0)
    length = len(cb)
    m = np.asarray(mask, dtype=bool)
    if length < 4:
        zero = np.zeros(length)
        return dict.fromkeys(("omega_num", "omega_img", "omega_rec", "theta_num", "theta_den"),
                             zero)  # fmt: skip
    u = -ca_directions(cb, features.phi, m)
    r = pairwise_distances(cb)
    inv = np.divide(1.0, r, out=np.zeros_like(r), where=r > 1e-9)
    y, x = omega_parts(cb, u, inv)
    h = np.hypot(x, y)
    s_rec = np.divide(y, h, out=np.zeros_like(y), where=h > 1e-12)
    s_img = np.sin(features.omega)
    out = {
        "omega_num": np.sum(s_img * s_rec, axis=1, where=m),
        "omega_img": np.sum(s_img * s_img, axis=1, where=m),
        "omega_rec": np.sum(s_rec * s_rec, axis=1, where=m),
    }
    s_cos, s_sin = azimuth_sums(cb, u, features.theta, m)
    turned = cross(u, s_sin)
    # the largest |sum|: every partner's term, of length |p_ij| / d_ij^2, along one direction
    along = u @ cb.T - np.einsum("ik,ik->i", u, cb)[:, None]  # u_i . (Cb_j - Cb_i)
    perp = np.sqrt(np.maximum(r * r - along * along, 0.0))
    inv2 = np.where(m & (r > 1e-6), inv * inv, 0.0)
    out["theta_num"] = np.linalg.norm(s_cos - turned, axis=1) - np.linalg.norm(
        s_cos + turned, axis=1
    )
    out["theta_den"] = np.sum(perp * inv2, axis=1)
    return out


def _scores(ev: dict[str, np.ndarray], select=slice(None)) -> tuple[float | None, float | None]:
    """omega's correlation and theta's agreement over the residues ``select`` (None for the
    one without evidence)."""
    out: list[float | None] = []
    for num, den in (
        (np.sum(ev["omega_num"][select]),
         np.sqrt(np.sum(ev["omega_img"][select]) * np.sum(ev["omega_rec"][select]))),
        (np.sum(ev["theta_num"][select]), np.sum(ev["theta_den"][select])),
    ):  # fmt: skip
        value = float(num) / float(den) if float(den) > 1e-12 else None
        out.append(float(np.clip(value, -1.0, 1.0)) if value is not None and np.isfinite(value)
                   else None)  # fmt: skip
    return out[0], out[1]


def _combined(omega: float | None, theta: float | None) -> float:
    """The hand's evidence: the mean of omega's and theta's scores that exist (0 if none)."""
    have = [v for v in (omega, theta) if v is not None]
    return float(np.mean(have)) if have else 0.0


def handedness_score(cb, features: SixD, mask) -> float:
    """Correlation in [-1, 1] between sin(omega) of the image and of the structure ``cb`` with CA
    directions placed from phi (:func:`protoken.geometry.ca_directions`); the mirror image
    scores the negative. Pairs outside ``mask`` are ignored. 1 for an exact image; decoded
    images may keep little of omega's sign (the default tokenizer: ~0.04), when theta decides
    (:func:`handedness_confidence`)."""
    omega, _ = _scores(handedness_evidence(cb, features, mask))
    return 0.0 if omega is None else omega


def handedness_confidence(cb, features: SixD, mask) -> float:
    """The evidence, in [-1, 1], that ``cb`` has the hand the image's signed angles ask for:
    the mean of omega's correlation (:func:`handedness_score`) and theta's agreement
    (:func:`handedness_evidence`) over the pairs in ``mask``; the mirror image scores the
    negative, its sign decides the hand (:func:`resolve_handedness`).

    0.7-0.9 for exact images (omega 1, theta 0.4-0.8: the mirror image still fits theta in
    part), about 0.3 for the default tokenizer's decoded images (where omega's part is near 0
    and theta's near 0.6); 0 when no pair carries a signed angle.
    """
    return _combined(*_scores(handedness_evidence(cb, features, mask)))


def _resolve(cb, features: SixD, mask) -> tuple[np.ndarray, bool, float, float]:
    """:func:`resolve_handedness`, also returning the :func:`handedness_confidence` of the
    returned coordinates (>= 0)."""
    cb = np.asarray(cb, dtype=np.float64)
    cb = cb - cb.mean(axis=0)
    omega, theta = _scores(handedness_evidence(cb, features, mask))
    omega_score = 0.0 if omega is None else omega
    confidence = _combined(omega, theta)
    if confidence < 0:
        return cb * np.array([1.0, 1.0, -1.0]), True, -omega_score, -confidence
    return cb, False, omega_score, confidence


def resolve_handedness(cb, features: SixD, mask) -> tuple[np.ndarray, bool, float]:
    """Return ``cb`` with the handedness the image's signed angles (omega, theta) ask for: the
    sign of :func:`handedness_confidence` decides.

    Parameters
    ----------
    cb : array_like, shape (L, 3)
        Coordinates of either handedness (e.g. from :func:`mds`).
    features : SixD
        The image's features (omega, theta and phi are used).
    mask : array_like of bool, shape (L, L)
        Pairs whose angles are meaningful (known distances, i != j).

    Returns
    -------
    cb : ndarray, shape (L, 3)
        Centred coordinates, mirrored (z -> -z) if needed.
    mirrored : bool
        Whether the input had the wrong handedness.
    score : float
        :func:`handedness_score` (omega's correlation) of the returned coordinates: >= 0
        unless theta outvoted omega.
    """
    cb, mirrored, score, _ = _resolve(cb, features, mask)
    return cb, mirrored, score


def rigid_parts(distances, clipped, dmax: float = DMAX) -> np.ndarray:
    """Residues grouped into parts inside which every distance is known.

    Complete-linkage clustering (``scipy.cluster.hierarchy``) of the image's distances, cut
    below dmax: within a part no pair is clipped, so the part's shape is fixed by its distances
    up to a reflection, which the part's own angles decide. A compact protein is one part; a rod
    is cut into pieces shorter than dmax, two domains on a linker into (at least) two.

    Parameters
    ----------
    distances : array_like, shape (L, L)
    clipped : array_like of bool, shape (L, L)
    dmax : float

    Returns
    -------
    ndarray of int, shape (L,)
        Part labels 0, 1, ...; parts numbered by their first residue.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    d = np.array(distances, dtype=np.float64)
    length = len(d)
    if length < 2:
        return np.zeros(length, dtype=np.intp)
    np.nan_to_num(d, copy=False, nan=2.0 * dmax, posinf=2.0 * dmax, neginf=0.0)
    d = np.maximum(d, d.T)
    d[np.asarray(clipped, dtype=bool)] = 2.0 * dmax
    np.fill_diagonal(d, 0.0)
    tree = linkage(squareform(d, checks=False), method="complete")
    labels = fcluster(tree, t=dmax, criterion="distance")
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))  # number parts by their first residue
    return order[np.searchsorted(np.unique(labels), labels)].astype(np.intp)


#: Parts smaller than this (residues) are not judged on their own: too few pairs.
MIN_PART = 8


def part_scores(cb, features: SixD, mask, parts) -> tuple[np.ndarray, np.ndarray]:
    """:func:`handedness_confidence` of each rigid part, from the pairs inside it.

    Returns
    -------
    scores : ndarray, shape (K,)
        In [-1, 1] (0 without evidence).
    judged : ndarray of bool, shape (K,)
        Parts of at least :data:`MIN_PART` residues with evidence.
    """
    parts = np.asarray(parts)
    inside = np.asarray(mask, dtype=bool) & (parts[:, None] == parts[None, :])
    ev = handedness_evidence(cb, features, inside)
    n_parts = int(parts.max()) + 1 if len(parts) else 0
    scores = np.zeros(n_parts)
    judged = np.zeros(n_parts, dtype=bool)
    for k in range(n_parts):
        sel = parts == k
        omega, theta = _scores(ev, sel)
        scores[k] = _combined(omega, theta)
        judged[k] = (omega is not None or theta is not None) and int(sel.sum()) >= MIN_PART
    return scores, judged


#: Radius, Angstrom, of the neighbourhood whose pairs give each residue's own hand
#: (:func:`residue_handedness`).
LOCAL_RADIUS = 20.0

#: At most this many stretches are tried by :func:`resolve_part_handedness`.
MAX_FLIP_TRIALS = 8


def residue_handedness(cb, features: SixD, mask, distances, radius: float = LOCAL_RADIUS):
    """Each residue's own evidence for the hand of ``cb``: :func:`handedness_confidence` from
    its pairs in ``mask`` closer than ``radius`` (Angstrom, image distances), in [-1, 1]
    (0 without evidence). A stretch that came out as its mirror image, joined to the rest by
    kinks, shows as a run of negative values.

    Returns
    -------
    ndarray, shape (L,)
    """
    local = np.asarray(mask, dtype=bool) & (np.asarray(distances) < radius)
    ev = handedness_evidence(cb, features, local)
    den = np.sqrt(ev["omega_img"] * ev["omega_rec"])
    have_w, have_t = den > 1e-12, ev["theta_den"] > 1e-12
    omega = np.divide(ev["omega_num"], den, out=np.zeros_like(den), where=have_w)
    theta = np.divide(ev["theta_num"], ev["theta_den"], out=np.zeros_like(den), where=have_t)
    count = have_w.astype(np.float64) + have_t
    return np.divide(omega + theta, count, out=np.zeros_like(den), where=count > 0)


def _runs(flags: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """[start, stop) of the runs of True in ``flags`` at least ``min_len`` long."""
    padded = np.concatenate(([False], np.asarray(flags, dtype=bool), [False]))
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)
            if b - a >= min_len]  # fmt: skip


def _flip_part(x: np.ndarray, sel: np.ndarray, known: np.ndarray) -> np.ndarray:
    """``x`` with the residues ``sel`` replaced by their mirror image, superposed (proper
    rotation) onto their old place by the residues with known partners outside them (those
    that attach them), so that they keep their connections."""
    from protoken.metrics import kabsch

    sub = x[sel]
    weights = known[np.ix_(sel, ~sel)].sum(axis=1).astype(np.float64)
    if weights.sum() <= 0:
        weights = np.ones(len(sub))
    mirror = sub * np.array([1.0, 1.0, -1.0])
    rot, trans = kabsch(mirror, sub, weights)
    out = x.copy()
    out[sel] = mirror @ rot.T + trans
    return out


def resolve_part_handedness(
    cb,
    features: SixD,
    known,
    distances,
    clipped,
    dmax: float = DMAX,
    max_trials: int = MAX_FLIP_TRIALS,
) -> tuple[np.ndarray, int]:
    """Mirror back the stretches of the chain whose own angles ask for the other hand.

    With clipped pairs the refinement can end in a local minimum where a stretch (part of a
    long helix, a domain beyond a linker) is the mirror image of what it should be, joined to
    the rest by kinks; the whole's hand (:func:`resolve_handedness`) then outvotes it. Each
    run of at least :data:`MIN_PART` residues whose own evidence (:func:`residue_handedness`)
    is negative, most negative first, is mirrored in place (:func:`_flip_part`) and the whole
    refined again (:func:`refine_distances`); the flip is kept if the stress fell, or stayed
    within 5 % while :func:`handedness_confidence` rose (a part that distances alone cannot
    orient). At most ``max_trials`` flips are tried.

    Parameters
    ----------
    cb : array_like, shape (L, 3)
        Refined coordinates, the whole already in the image's hand.
    features : SixD
    known, clipped : array_like of bool, shape (L, L)
    distances : array_like, shape (L, L)
    dmax : float

    Returns
    -------
    cb : ndarray, shape (L, 3)
        Centred.
    flipped : int
        Stretches mirrored back.
    """
    x = np.asarray(cb, dtype=np.float64)
    x = x - x.mean(axis=0)
    known = np.asarray(known, dtype=bool)
    d = np.asarray(distances, dtype=np.float64)
    if len(x) < 2 * MIN_PART:
        return x, 0
    f0 = stress(x, d, clipped, dmax)[0]
    conf0 = None
    flipped = 0
    tried: set[tuple[int, int]] = set()
    for _ in range(max_trials):
        e = residue_handedness(x, features, known, d)
        runs = [r for r in _runs(e < 0, MIN_PART) if r not in tried]
        if not runs:
            break
        run = min(runs, key=lambda r: float(e[r[0] : r[1]].sum()))
        tried.add(run)
        sel = np.zeros(len(x), dtype=bool)
        sel[run[0] : run[1]] = True
        trial = refine_distances(_flip_part(x, sel, known), d, clipped, dmax)
        f1 = stress(trial, d, clipped, dmax)[0]
        if f1 < f0 * 0.999:
            keep = True
        elif f1 <= 1.05 * f0 + 1e-12:
            conf0 = handedness_confidence(x, features, known) if conf0 is None else conf0
            conf1 = handedness_confidence(trial, features, known)
            keep = conf1 > conf0
        else:
            keep = False
        if keep:
            x, f0, conf0 = trial, f1, None
            flipped += 1
    return x, flipped


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
        distance violation exceeds ``REFINE_RMS`` (as for 8-bit or model-decoded images), and
        mirror back stretches in the wrong hand (:func:`resolve_part_handedness`). False:
        classical MDS only (of the distances with the clipped ones filled by shortest paths),
        and the hand of the whole.
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

    if not n_clipped:  # every distance known: MDS is exact up to the image's noise
        x = mds(d)
        rms_mds = distance_rms(x, d, clipped, dmax)
        refined = bool(refine and rms_mds > REFINE_RMS)
        rms = rms_mds
        if refined:
            x = refine_distances(x, d, clipped, dmax)
            rms = distance_rms(x, d, clipped, dmax)
        x, mirrored, score, confidence = _resolve(x, features, known)
        n_parts, flipped = 1, 0
    else:
        x, rms_mds, rms, mirrored, score, n_parts, flipped, confidence = _reconstruct_clipped(
            d, clipped, known, features, dmax, refine
        )
        refined = bool(refine)
    rec = Reconstruction(
        cb=x,
        mirrored_before_fix=mirrored,
        clipped_pairs=n_clipped,
        handedness_score=score,
        handedness_confidence=confidence,
        rigid_parts=n_parts,
        mirrored_parts=flipped,
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


def _reconstruct_clipped(d, clipped, known, features, dmax, refine):
    """The distance stage when pairs are clipped: MDS of the distances with the clipped ones
    filled by shortest paths (:func:`fill_clipped`), refinement with the lower bounds
    (:func:`refine_distances`), the hand of the whole (:func:`resolve_handedness`), then of
    each stretch of the chain (:func:`resolve_part_handedness`); the confidence is the weakest
    rigid part's (:func:`rigid_parts`, :func:`part_scores`)."""
    x = mds(fill_clipped(d, clipped, dmax))
    rms_mds = distance_rms(x, d, clipped, dmax)
    if refine:
        x = refine_distances(x, d, clipped, dmax)
    x, mirrored, score, confidence = _resolve(x, features, known)
    flipped = 0
    if refine:
        x, flipped = resolve_part_handedness(x, features, known, d, clipped, dmax)
        if flipped:  # the whole's hand again: the stretches mirrored back may have been most
            x, again, score, confidence = _resolve(x, features, known)
            mirrored = mirrored != again
    parts = rigid_parts(d, clipped, dmax)
    scores, judged = part_scores(x, features, known, parts)
    rms = distance_rms(x, d, clipped, dmax)
    if judged.any():
        confidence = min(confidence, float(scores[judged].min()))
    return x, rms_mds, rms, mirrored, score, int(parts.max()) + 1, flipped, confidence
