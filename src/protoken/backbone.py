"""The full backbone (N, CA, C, O, CB) from a 6D image, beyond the reference design's Cb-only MDS.

Per residue, the image fixes a rigid frame: the Cb position (MDS), the CA direction from the phi
angles, and the azimuth of N about the CA-Cb axis from the theta angles. Internal geometry is not in
the image, so an ideal residue (Engh & Huber 1991 bond lengths and angles, Cb by the reference
design's formula) is placed on each frame, then all atoms are refined together (torch, L-BFGS, ~1 s
for 256 residues on one core) against the image's d, omega, theta, phi on the known pairs, ideal
bond lengths and angles, peptide planarity and chain connectivity; O is added last from ideal
geometry. trRosetta and ProteinSGM need minutes of Rosetta minimisation for this step.

1. :func:`protoken.geometry.ca_directions`: phi_ij = angle(CA_i, Cb_i, Cb_j), so
   the unit vector w_i from Cb_i to CA_i satisfies w_i . e_ij = cos(phi_ij) for every partner j;
   least squares over all j.
2. :func:`n_azimuths`: theta_ij = dihedral(N_i, CA_i, Cb_i, Cb_j) is the angle, about the axis
   u_i = -w_i, from the N_i direction to the direction of Cb_j; rotating each partner's
   direction back by theta_ij gives the N_i direction, averaged over all j.
3. :func:`place_residues`: the ideal residue on each frame (N, CA, C exact up to the
   protein's deviations from ideal geometry, ~0.03 A).
4. :func:`refine_backbone`: gradient-based refinement of all N, CA, C (Cb follows from the reference
   design's formula, so d, omega, theta and phi are all functions of N, CA, C), with data weights
   set by the image's own noise, so that noisy model outputs still give ideal geometry.
5. :func:`project_bonds`: bond lengths set exactly to ideal (moves of thousandths of an A).
6. :func:`add_oxygens`: O in the peptide plane, C=O 1.231 A, CA-C-O 120.1 deg, O-C-N 122.7 deg.

One module of ~600 lines on purpose: the backbone stage is one pipeline read in order (frames,
ideal residues, refinement, bonds, oxygens), each step feeding the next its arrays.
"""

from __future__ import annotations

import math
import time

import numpy as np

from protoken.geometry import (
    CB_A,
    CB_B,
    CB_C,
    SixD,
    ca_directions,
    cross,
    pairwise_distances,
    virtual_cb,
)

__all__ = [
    "IDEAL",
    "add_oxygens",
    "azimuth_sums",
    "bond_deviations",
    "build_backbone",
    "chain_links",
    "ideal_residue",
    "n_azimuths",
    "place_residues",
    "project_bonds",
    "refine_backbone",
    "residue_frames",
]

#: Ideal backbone geometry (Engh & Huber 1991), Angstrom and degrees.
IDEAL = {
    "N-CA": 1.458,
    "CA-C": 1.525,
    "C-N": 1.329,
    "C-O": 1.231,
    "N-CA-C": 111.2,
    "CA-C-N": 116.2,
    "C-N-CA": 121.7,
    "CA-C-O": 120.1,
    "O-C-N": 122.7,
}


def ideal_residue() -> dict[str, np.ndarray]:
    """N, CA, C and the reference design's virtual Cb of an ideal residue, in its Cb frame.

    Frame: origin Cb; x along Cb - CA (so CA = (-|CA-Cb|, 0, 0)); N in the xy plane with y > 0;
    z = x cross y. Returns atom name -> (3,) coordinates.
    """
    tau = math.radians(IDEAL["N-CA-C"])
    ca = np.zeros(3)
    n = np.array([IDEAL["N-CA"], 0.0, 0.0])
    c = IDEAL["CA-C"] * np.array([math.cos(tau), math.sin(tau), 0.0])
    cb = virtual_cb(n, ca, c)
    x = (cb - ca) / np.linalg.norm(cb - ca)
    y = (n - ca) - np.dot(n - ca, x) * x
    y /= np.linalg.norm(y)
    z = np.cross(x, y)
    frame = np.stack([x, y, z])
    return {name: frame @ (p - cb) for name, p in (("N", n), ("CA", ca), ("C", c), ("CB", cb))}


def azimuth_sums(
    cb: np.ndarray, u: np.ndarray, theta: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The sums :func:`n_azimuths` places N from: sum_j w_ij cos(theta_ij) p_ij and
    sum_j w_ij sin(theta_ij) p_ij over the partners j in ``mask``, with p_ij the part of
    Cb_j - Cb_i perpendicular to u_i and w_ij = 1 / d_ij^2.

    The N direction is along ``s_cos - u x s_sin``; a structure of the other hand would need
    ``s_cos + u x s_sin`` (:func:`protoken.reconstruct.handedness_evidence` compares the two).

    Parameters
    ----------
    cb, u : ndarray, shape (L, 3)
    theta : ndarray, shape (L, L), radians
    mask : ndarray of bool, shape (L, L)

    Returns
    -------
    s_cos, s_sin : ndarray, shape (L, 3)
        Each perpendicular to u_i, Angstrom^-1.
    """
    r = pairwise_distances(cb)
    m = np.asarray(mask, dtype=bool) & (r > 1e-6)
    inv2 = np.divide(1.0, r * r, out=np.zeros_like(r), where=m)
    sums = []
    for weight in (np.cos(theta) * inv2, np.sin(theta) * inv2):
        s = weight @ cb - weight.sum(axis=1)[:, None] * cb  # sum_j w_ij (Cb_j - Cb_i)
        s -= np.sum(s * u, axis=1, keepdims=True) * u  # perpendicular to u_i
        sums.append(s)
    return sums[0], sums[1]


def n_azimuths(cb: np.ndarray, u: np.ndarray, theta: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Unit vectors, perpendicular to u_i, pointing from the CA-Cb axis towards N_i.

    With p_ij the part of (Cb_j - Cb_i) perpendicular to u_i = (Cb_i - CA_i) / |Cb_i - CA_i|,
    theta_ij = atan2((u_i x v_i) . p_ij, v_i . p_ij) for the N direction v_i; hence
    v_i is parallel to cos(theta_ij) p_ij - sin(theta_ij) (u_i x p_ij) for every j. The sum over
    the partners in ``mask`` (weighted by |p_ij| / d_ij, so pairs along the axis count little)
    is normalised.

    Parameters
    ----------
    cb, u : ndarray, shape (L, 3)
    theta : ndarray, shape (L, L), radians
    mask : ndarray of bool, shape (L, L)

    Returns
    -------
    ndarray, shape (L, 3)
    """
    s_cos, s_sin = azimuth_sums(cb, u, theta, mask)
    out = s_cos - cross(u, s_sin)
    norm = np.linalg.norm(out, axis=1)
    bad = ~(np.isfinite(norm) & (norm > 1e-9))
    if bad.any():  # no usable partner: any direction perpendicular to u
        helper = np.where(np.abs(u[bad, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
        alt = cross(u[bad], helper)
        out[bad] = alt
        norm[bad] = np.linalg.norm(alt, axis=1)
    return out / norm[:, None]


def place_residues(cb: np.ndarray, u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Ideal residues on the frames (origin Cb, x = u, y = v, z = u x v).

    Returns N, CA, C (each (L, 3)); their virtual Cb is ``cb`` exactly.
    """
    w = cross(u, v)
    out = {}
    for name, (a, b, c) in ideal_residue().items():
        if name != "CB":
            out[name] = cb + a * u + b * v + c * w
    return out


def chain_links(atoms: dict[str, np.ndarray], max_gap: float = 2.5) -> np.ndarray:
    """Peptide bonds i -> i+1 to enforce: those whose C_i - N_{i+1} distance after placement is
    below ``max_gap`` Angstrom (1.33 in a connected chain; chain breaks, i.e. residues missing
    in the original structure, are left free). Returns a bool array of length L - 1."""
    c, n = atoms["C"][:-1], atoms["N"][1:]
    return np.linalg.norm(n - c, axis=1) < max_gap


def add_oxygens(
    n: np.ndarray, ca: np.ndarray, c: np.ndarray, links: np.ndarray | None = None
) -> np.ndarray:
    """Carbonyl O from ideal geometry.

    Linked residues: O_i in the plane of CA_i, C_i, N_{i+1}, 1.231 A from C_i, with the angles
    CA-C-O 120.1 and O-C-N 122.7 deg (least squares when the CA-C-N angle is not ideal).
    Unlinked ones (chain ends, breaks): O_i at 120.1 deg from CA_i, trans to N_i about CA-C
    (psi is then unknown).
    """
    length = len(ca)
    links = np.zeros(max(length - 1, 0), bool) if links is None else np.asarray(links, bool)
    a = ca - c
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    cos_a, cos_b = math.cos(math.radians(IDEAL["CA-C-O"])), math.cos(math.radians(IDEAL["O-C-N"]))
    # default: in the N-CA-C plane, on the side away from N (dihedral N-CA-C-O = 180 deg)
    nn = n - ca
    perp = nn - np.sum(nn * a, axis=1, keepdims=True) * a
    perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-12)
    sin_a = math.sin(math.radians(IDEAL["CA-C-O"]))
    o_dir = cos_a * a - sin_a * perp
    idx = np.flatnonzero(links)
    if len(idx):
        b = n[idx + 1] - c[idx]
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        ab = np.sum(a[idx] * b, axis=1)
        det = 1.0 - ab * ab
        ok = det > 1e-6
        alpha = (cos_a - ab * cos_b) / np.where(ok, det, 1.0)
        beta = (cos_b - ab * cos_a) / np.where(ok, det, 1.0)
        d = alpha[:, None] * a[idx] + beta[:, None] * b
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
        o_dir[idx[ok]] = d[ok]
    return c + IDEAL["C-O"] * o_dir


# --------------------------------------------------------------------------- refinement

#: Default loss weights of :func:`refine_backbone`: inverse variances of the tolerated errors
#: (distances 0.05 A, image angles 1 deg, bonds 0.005 A, bond angles 2 deg, peptide planarity
#: 5 deg), each applied to the mean of its term. The data weights are upper bounds (loosened to
#: the image's measured noise); the Cb anchor's sigma is an argument.
WEIGHTS = {
    "distance": 1 / 0.05**2,
    "angles": 2 / math.radians(1.0) ** 2,
    "bonds": 1 / 0.005**2,
    "bond_angles": 1 / (math.sin(math.radians(115.0)) * math.radians(2.0)) ** 2,
    "planarity": 1 / math.sin(math.radians(5.0)) ** 2,
    "anchor": 1.0,
}


def _pairs(d: np.ndarray, known: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Ordered pairs (i, j), i != j, with a known distance below ``cutoff``."""
    m = known & (d < cutoff)
    np.fill_diagonal(m, False)
    return np.nonzero(m)


def residue_frames(n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    """(Cb, u, v) of residues: Cb by the reference design's formula, u = unit(Cb - CA), v the unit
    part of N - CA perpendicular to u (the frame :func:`place_residues` builds on)."""
    cb = virtual_cb(n, ca, c)
    u = cb - ca
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    v = n - ca
    v -= np.sum(v * u, axis=1, keepdims=True) * u
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return cb, u, v


def refine_backbone(
    atoms: dict[str, np.ndarray],
    features: SixD,
    known: np.ndarray,
    links: np.ndarray,
    anchor: np.ndarray | None = None,
    anchor_sigma: float = 0.03,
    cutoff: float = 12.0,
    max_iter: int = 100,
    weights: dict[str, float] | None = None,
    threads: int | None = 1,
) -> tuple[dict[str, np.ndarray], dict]:
    """Refine every residue against the image and ideal chain geometry.

    Each residue starts as an ideal residue (:func:`ideal_residue`) on its frame and is moved as
    a rigid body (translation, rotation vector) plus a free deformation of its N, CA, C: every
    atom is free, but the rigid part, the 6 degrees of freedom the image determines, is
    explicit, which spares L-BFGS the stiffness of the bond terms (it converges in ~60
    iterations where plain coordinates need hundreds). Optimised with torch's L-BFGS (strong
    Wolfe line search, float64): the weighted sum of the means of

    - (|Cb_i - Cb_j| - d_ij)^2 over the known pairs closer than ``cutoff`` (Cb by the reference
      design's formula from N, CA, C);
    - 1 - cos(x - x_image) for x = omega_ij, theta_ij, phi_ij over the same pairs;
    - (b - b0)^2 for the bonds N-CA, CA-C, and C_i-N_{i+1} across the peptide bonds in
      ``links``;
    - (cos a - cos a0)^2 for the angles N-CA-C, and CA-C-N, C-N-CA across links;
    - sin^2 of the peptide dihedral CA_i-C_i-N_{i+1}-CA_{i+1} (planar, cis or trans);
    - |Cb_i - anchor_i|^2 / anchor_sigma^2: the Cb of the distance stage, which used every pair
      (long-range and clipped ones included), keeps the global arrangement that local pair
      terms alone would let drift.

    The data weights (:data:`WEIGHTS`: sigma 0.05 A and 1 deg) are loosened to the image's own
    noise, measured as the RMS distance and angle errors of the start: the placement reproduces
    an exact image's angles exactly, so this is the noise of a quantised or model-decoded
    image. Noisy images thus lean on ideal geometry instead of bending bonds to fit noise.

    Parameters
    ----------
    atoms : dict with N, CA, C, each (L, 3)
        Start (e.g. :func:`place_residues`); ideal residues are put on their frames
        (:func:`residue_frames`).
    features : SixD
        The image's d, omega, theta, phi.
    known : ndarray of bool, shape (L, L)
        Pairs with a known distance (not clipped, i != j).
    links : ndarray of bool, shape (L - 1,)
        Peptide bonds to enforce (:func:`chain_links`).
    anchor : ndarray, shape (L, 3), optional
        Cb coordinates to stay near (default: the start's Cb).
    anchor_sigma : float
        Their tolerated error, Angstrom.
    cutoff : float
        Pair terms only for known pairs closer than this (Angstrom).
    max_iter : int
        L-BFGS iterations.
    weights : dict, optional
        Overrides of :data:`WEIGHTS`.
    threads : int or None
        torch intra-op threads during the refinement, restored afterwards (default 1: the
        tensors are small, and OpenMP threads competing for busy cores cost 10x; None keeps
        torch's setting).

    Returns
    -------
    atoms : dict
        Refined N, CA, C (numpy, (L, 3) each); the start's ideal residues if the refinement
        failed.
    info : dict
        ``loss_start``, ``loss_end``, ``iterations`` (function evaluations), ``pairs``,
        ``distance_rms_start`` (A) and ``angle_rms_deg_start`` (the measured noise).
    """
    import torch

    w = {**WEIGHTS, **(weights or {})}
    cb, u, v = residue_frames(*(np.asarray(atoms[k], dtype=np.float64) for k in ("N", "CA", "C")))
    start = place_residues(cb, u, v)
    info = {"pairs": 0, "iterations": 0, "loss_start": 0.0, "loss_end": 0.0}
    if len(cb) < 2:
        return start, info
    if anchor is None:
        anchor = cb
    w["anchor"] = w["anchor"] / max(anchor_sigma, 1e-3) ** 2
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _refine(torch, cb, u, v, features, known, links, anchor, cutoff, max_iter, w, info)
    finally:
        if threads:
            torch.set_num_threads(old_threads)


def _refine(torch, cb0, u, v, features, known, links, anchor, cutoff, max_iter, w, info):
    length = len(cb0)
    ii, jj = _pairs(features.d, known, cutoff)
    info["pairs"] = len(ii)
    ii_t, jj_t = torch.from_numpy(ii), torch.from_numpy(jj)

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))

    d_t = tensor(features.d[ii, jj])
    trig = {}
    for key in ("omega", "theta", "phi"):
        values = tensor(getattr(features, key)[ii, jj])
        trig[key] = (torch.cos(values), torch.sin(values))
    link_idx = torch.from_numpy(np.flatnonzero(links))
    anchor_t = tensor(anchor)
    # each residue: atoms = t + R(rot) (offsets0 + delta), offsets0 = the ideal residue on its
    # frame; t starts at Cb, rot and delta at 0
    template = ideal_residue()
    frame = np.stack([u, v, np.cross(u, v)], axis=2)  # (L, 3, 3), columns u, v, w
    offsets0 = tensor(
        np.stack([frame @ template[k] for k in ("N", "CA", "C")], axis=1)
    )  # (L, 3 atoms, 3)
    trans = tensor(cb0).clone().requires_grad_(True)
    rot = torch.zeros((length, 3), dtype=torch.float64, requires_grad=True)
    delta = torch.zeros((length, 3, 3), dtype=torch.float64, requires_grad=True)
    cos0 = {k: math.cos(math.radians(IDEAL[k])) for k in ("N-CA-C", "CA-C-N", "C-N-CA")}

    def norm(x):
        return torch.sqrt(torch.sum(x * x, dim=-1) + 1e-24)

    def rotations(r):
        """Rodrigues: rotation matrices (L, 3, 3) of rotation vectors r (L, 3)."""
        theta = torch.sqrt(torch.sum(r * r, dim=-1) + 1e-24)[:, None, None]
        k = torch.zeros((length, 3, 3), dtype=r.dtype)
        k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -r[:, 2], r[:, 1], -r[:, 0]
        k = k - k.transpose(1, 2)
        eye = torch.eye(3, dtype=r.dtype).expand(length, 3, 3)
        small = theta < 1e-4  # Taylor series where the closed forms lose precision
        a = torch.where(small, 1 - theta**2 / 6, torch.sin(theta) / theta)
        b = torch.where(small, 0.5 - theta**2 / 24, (1 - torch.cos(theta)) / theta**2)
        return eye + a * k + b * (k @ k)

    def dihedral_parts(a, b, c, d):
        """(y, x) of the reference design's dihedral a-b-c-d: angle = atan2(y, x)."""
        b1 = c - b
        b1 = b1 / norm(b1)[..., None]
        b0, b2 = a - b, d - c
        v_ = b0 - torch.sum(b0 * b1, -1, keepdim=True) * b1
        u_ = b2 - torch.sum(b2 * b1, -1, keepdim=True) * b1
        return torch.sum(torch.linalg.cross(b1, v_) * u_, -1), torch.sum(v_ * u_, -1)

    def cos_angle(a, b, c):
        x, y = a - b, c - b
        return torch.sum(x * y, -1) / (norm(x) * norm(y))

    def angle_loss(y, x, key):
        cos_t, sin_t = trig[key]
        return torch.mean(1.0 - (x * cos_t + y * sin_t) / torch.sqrt(x * x + y * y + 1e-24))

    def positions():
        xyz = trans[:, None, :] + (offsets0 + delta) @ rotations(rot).transpose(1, 2)
        n, ca, c = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        b, cc = ca - n, c - ca
        cb = CB_A * torch.linalg.cross(b, cc) + CB_B * b + CB_C * cc + ca
        return n, ca, c, cb

    def loss_fn():
        n, ca, c, cb = positions()
        total = w["anchor"] * torch.mean(torch.sum((cb - anchor_t) ** 2, dim=-1))
        bonds = [norm(n - ca) - IDEAL["N-CA"], norm(c - ca) - IDEAL["CA-C"]]
        bends = [cos_angle(n, ca, c) - cos0["N-CA-C"]]
        if len(ii):
            cbi, cbj, cai = cb[ii_t], cb[jj_t], ca[ii_t]
            total = total + w["distance"] * torch.mean((norm(cbj - cbi) - d_t) ** 2)
            ang = angle_loss(*dihedral_parts(cai, cbi, cbj, ca[jj_t]), "omega")
            ang = ang + angle_loss(*dihedral_parts(n[ii_t], cai, cbi, cbj), "theta")
            cphi = cos_angle(cai, cbi, cbj).clamp(-1.0, 1.0)
            sphi = torch.sqrt(torch.clamp(1.0 - cphi * cphi, min=0.0) + 1e-24)
            cos_t, sin_t = trig["phi"]
            ang = ang + torch.mean(1.0 - cphi * cos_t - sphi * sin_t)
            total = total + w["angles"] * ang
        if len(link_idx):
            ci, nj = c[link_idx], n[link_idx + 1]
            cai, caj = ca[link_idx], ca[link_idx + 1]
            bonds.append(norm(nj - ci) - IDEAL["C-N"])
            bends.append(cos_angle(cai, ci, nj) - cos0["CA-C-N"])
            bends.append(cos_angle(ci, nj, caj) - cos0["C-N-CA"])
            y, x = dihedral_parts(cai, ci, nj, caj)
            total = total + w["planarity"] * torch.mean(y * y / (x * x + y * y + 1e-24))
        total = total + w["bonds"] * torch.mean(torch.cat(bonds) ** 2)
        total = total + w["bond_angles"] * torch.mean(torch.cat(bends) ** 2)
        return total

    opt = torch.optim.LBFGS(
        [trans, rot, delta],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.no_grad():
        if len(ii):
            # the noise of the image, measured on the start (which reproduces exact images'
            # angles exactly): data terms are weighted by it, never tighter than WEIGHTS
            n, ca, c, cb = positions()
            cbi, cbj, cai = cb[ii_t], cb[jj_t], ca[ii_t]
            d_rms = float(torch.sqrt(torch.mean((norm(cbj - cbi) - d_t) ** 2)))
            ang = angle_loss(*dihedral_parts(cai, cbi, cbj, ca[jj_t]), "omega")
            ang = ang + angle_loss(*dihedral_parts(n[ii_t], cai, cbi, cbj), "theta")
            a_rms = math.sqrt(max(float(ang), 0.0))  # each mean of 1 - cos ~ rms^2 / 2
            info["distance_rms_start"] = d_rms
            info["angle_rms_deg_start"] = math.degrees(a_rms)
            w["distance"] = min(w["distance"], 1.0 / max(d_rms, 1e-6) ** 2)
            w["angles"] = min(w["angles"], 2.0 / max(a_rms, 1e-6) ** 2)
        info["loss_start"] = float(loss_fn())
    try:
        opt.step(closure)
    except RuntimeError:  # pragma: no cover - a numerical failure keeps the start
        pass
    with torch.no_grad():
        end = float(loss_fn())
        n, ca, c, _ = (t.numpy().copy() for t in positions())
    info["iterations"] = calls[0]
    out = {"N": n, "CA": ca, "C": c}
    if not (all(np.isfinite(a).all() for a in out.values()) and math.isfinite(end)) or (
        end > info["loss_start"]
    ):
        info["loss_end"] = info["loss_start"]
        return place_residues(cb0, u, v), info
    info["loss_end"] = end
    return out, info


# --------------------------------------------------------------------------- pipeline


def project_bonds(
    atoms: dict[str, np.ndarray], links: np.ndarray, tol: float = 1e-4, max_sweeps: int = 200
) -> tuple[dict[str, np.ndarray], int]:
    """Set every backbone bond (N-CA, CA-C, linked C-N) to its ideal length (SHAKE-style).

    The chain N0, CA0, C0, N1, ... is a path; each sweep corrects the even-numbered bonds of
    the path, then the odd ones (bonds within a group share no atom), moving both atoms of a
    bond along it by half its error. Bond angles are left as they are. Used after the
    refinement, where the corrections are thousandths of an Angstrom.

    Returns
    -------
    atoms : dict
        N, CA, C with ideal bond lengths (to ``tol``).
    sweeps : int
        Sweeps done.
    """
    n, ca, c = (np.asarray(atoms[k], dtype=np.float64) for k in ("N", "CA", "C"))
    length = len(ca)
    path = np.stack([n, ca, c], axis=1).reshape(-1, 3).copy()
    target = np.tile([IDEAL["N-CA"], IDEAL["CA-C"], IDEAL["C-N"]], length)[:-1]
    active = np.ones(len(target), dtype=bool)
    active[2::3] = links  # bond 3i + 2 joins C_i to N_{i+1}
    groups = [k[active[k]] for k in (np.arange(0, len(target), 2), np.arange(1, len(target), 2))]
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 - the count is returned
        worst = 0.0
        for k in groups:
            d = path[k + 1] - path[k]
            r = np.maximum(np.linalg.norm(d, axis=1), 1e-9)
            err = r - target[k]
            worst = max(worst, float(np.abs(err).max(initial=0.0)))
            shift = (0.5 * err / r)[:, None] * d
            path[k] += shift
            path[k + 1] -= shift
        if worst < tol:
            break
    xyz = path.reshape(length, 3, 3)
    return {"N": xyz[:, 0], "CA": xyz[:, 1], "C": xyz[:, 2]}, sweeps


def bond_deviations(atoms: dict[str, np.ndarray], links: np.ndarray) -> np.ndarray:
    """|b - b0| of every backbone bond (N-CA, CA-C, linked C-N, C-O), Angstrom."""
    n, ca, c = atoms["N"], atoms["CA"], atoms["C"]
    devs = [
        np.linalg.norm(n - ca, axis=1) - IDEAL["N-CA"],
        np.linalg.norm(c - ca, axis=1) - IDEAL["CA-C"],
        np.linalg.norm(n[1:] - c[:-1], axis=1)[links] - IDEAL["C-N"],
    ]
    if "O" in atoms:
        devs.append(np.linalg.norm(atoms["O"] - c, axis=1) - IDEAL["C-O"])
    return np.abs(np.concatenate(devs))


def build_backbone(
    cb: np.ndarray,
    features: SixD,
    known: np.ndarray,
    refine: bool = True,
    cb_error: float = 0.0,
    **refine_options,
) -> tuple[dict[str, np.ndarray], dict]:
    """N, CA, C, O, CB of every residue from Cb coordinates and the image's orientations.

    Parameters
    ----------
    cb : ndarray, shape (L, 3)
        Cb coordinates with the right handedness (:func:`protoken.reconstruct.reconstruct`).
    features : SixD
        The image's features.
    known : ndarray of bool, shape (L, L)
        Pairs whose distance (and angles) are known: not clipped, i != j.
    refine : bool
        Run :func:`refine_backbone`, then :func:`project_bonds` (else the ideal residues as
        placed, whose peptide bonds are off by up to ~0.3 A).
    cb_error : float
        Expected error of ``cb``, Angstrom (e.g. the distance stage's RMS violation): the
        refinement keeps each Cb within max(0.03, cb_error) of it.
    **refine_options
        Passed to :func:`refine_backbone`.

    Returns
    -------
    atoms : dict
        ``N``, ``CA``, ``C``, ``O``, ``CB`` (in that order), each (L, 3); CB is the reference
        design's virtual Cb of the returned N, CA, C.
    info : dict
        ``links`` (peptide bonds enforced), ``chain_breaks``, ``max_bond_deviation`` (A, of the
        returned atoms), ``seconds``; with ``refine``: the refinement's ``loss_start``,
        ``loss_end``, ``iterations``, ``pairs``, ``distance_rms_start``,
        ``angle_rms_deg_start``, then ``max_bond_deviation_refined`` (before the projection),
        ``bond_projection_sweeps`` and ``bond_projection_max_shift`` (A).
    """
    t0 = time.perf_counter()
    cb = np.asarray(cb, dtype=np.float64)
    known = np.asarray(known, dtype=bool)
    u = -ca_directions(cb, features.phi, known)
    v = n_azimuths(cb, u, features.theta, known)
    atoms = place_residues(cb, u, v)
    links = chain_links(atoms)
    info: dict = {"links": int(links.sum()), "chain_breaks": int((~links).sum())}
    if refine:
        refine_options.setdefault("anchor_sigma", max(0.03, float(cb_error)))
        atoms, rinfo = refine_backbone(atoms, features, known, links, anchor=cb, **refine_options)
        info.update(rinfo)
        info["max_bond_deviation_refined"] = float(bond_deviations(atoms, links).max(initial=0.0))
        projected, info["bond_projection_sweeps"] = project_bonds(atoms, links)
        info["bond_projection_max_shift"] = float(
            max(np.linalg.norm(projected[k] - atoms[k], axis=1).max(initial=0.0) for k in atoms)
        )
        atoms = projected
    n, ca, c = atoms["N"], atoms["CA"], atoms["C"]
    out = {"N": n, "CA": ca, "C": c, "O": add_oxygens(n, ca, c, links), "CB": virtual_cb(n, ca, c)}
    info["max_bond_deviation"] = float(bond_deviations(out, links).max(initial=0.0))
    info["seconds"] = time.perf_counter() - t0
    return out, info
