"""Structure comparison: superposition by proper rotations, RMSD, TM-score and lDDT.

All functions take numpy coordinate arrays of shape (L, 3) (Angstrom) in matching residue order
unless stated otherwise. Superpositions use proper rotations only (det R = +1): a mirror image
never superposes onto its original, so a reconstruction with the wrong handedness shows up as a
large RMSD and a low TM-score instead of hiding behind a reflection. The one function that looks
at reflections, :func:`mirror_rmsd`, does so explicitly, to diagnose handedness.

- :func:`kabsch`, :func:`superpose`: least-squares rigid superposition (Kabsch 1976, with the
  determinant correction).
- :func:`rmsd`: root-mean-square deviation, after optimal superposition by default.
- :func:`tm_score`: TM-score (Zhang & Skolnick 2004), d0 = 1.24 (L - 15)^(1/3) - 1.8 with L the
  reference length. On the fixed residue correspondence by default, maximised over
  superpositions with the TM-score program's heuristic search (implemented here, vectorised);
  with ``align=True`` sequence-independently by TM-align (the ``tmtools`` bindings).
- :func:`lddt`: lDDT (Mariani et al. 2013), superposition-free.
- :func:`distance_mae`: the Cb-distance error of a decoded image against the true image, in
  Angstrom (no 3D needed).
- :func:`complex_scores`: a complex against its true structure: whole-complex TM-score on the
  known residue correspondence, per-chain TM-scores, and per interface DockQ, fnat, interface
  and ligand RMSD from the ``DockQ`` package (version 2, Mirabello & Wallner 2024).
"""

from __future__ import annotations

import os

import numpy as np

from protoken.geometry import pairwise_distances

__all__ = [
    "complex_scores",
    "d0",
    "distance_mae",
    "kabsch",
    "lddt",
    "mirror_rmsd",
    "rmsd",
    "superpose",
    "tm_score",
]


def _as_coords(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected coordinates of shape (L, 3), got {x.shape}")
    return x


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_coords(a, "a"), _as_coords(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"coordinate arrays differ in shape: {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("coordinates contain NaN or infinity")
    return a, b


def _kabsch_batch(
    mobile: np.ndarray, target: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Kabsch on a batch: mobile, target (L, 3), weights (S, L) -> R (S, 3, 3), t (S, 3).

    ``mobile @ R[s].T + t[s]`` is the best fit of mobile onto target under weights[s]; det R = +1.
    """
    wsum = np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
    mc = weights @ mobile / wsum  # (S, 3) weighted centroids
    tc = weights @ target / wsum
    # covariance H_s = sum_l w_sl (m_l - mc_s)(t_l - tc_s)^T = sum w m t^T - W mc tc^T
    h = np.einsum("sl,li,lj->sij", weights, mobile, target) - wsum[:, :, None] * (
        mc[:, :, None] * tc[:, None, :]
    )
    u, _, vt = np.linalg.svd(h)
    # R = V diag(1, 1, det(V U^T)) U^T: the nearest proper rotation
    sign = np.sign(
        np.linalg.det(np.einsum("sij,sjk->sik", vt.transpose(0, 2, 1), u.transpose(0, 2, 1)))
    )
    sign[sign == 0] = 1.0
    vt = vt.copy()
    vt[:, 2, :] *= sign[:, None]
    rot = np.einsum("sji,skj->sik", vt, u)  # (V diag U^T) = vt^T @ u^T
    trans = tc - np.einsum("sij,sj->si", rot, mc)
    return rot, trans


def kabsch(mobile, target, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rigid superposition of ``mobile`` onto ``target`` by a proper rotation.

    Parameters
    ----------
    mobile, target : array_like, shape (L, 3)
        Corresponding points.
    weights : array_like, shape (L,), optional
        Non-negative per-point weights (default: all 1).

    Returns
    -------
    R : ndarray, shape (3, 3)
        Rotation with det R = +1 (reflections are never returned).
    t : ndarray, shape (3,)
        Translation; ``mobile @ R.T + t`` is the superposed ``mobile``.
    """
    mobile, target = _pair(mobile, target)
    w = np.ones(len(mobile)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(mobile),) or (w < 0).any():
        raise ValueError("weights must be non-negative, one per point")
    rot, trans = _kabsch_batch(mobile, target, w[None, :])
    return rot[0], trans[0]


def superpose(mobile, target, weights=None) -> np.ndarray:
    """``mobile`` (L, 3) rigidly moved onto ``target`` (L, 3) by :func:`kabsch` (proper
    rotation and translation); returns the moved coordinates (L, 3)."""
    rot, trans = kabsch(mobile, target, weights)
    return np.asarray(mobile, dtype=np.float64) @ rot.T + trans


def rmsd(a, b, superpose: bool = True) -> float:
    """Root-mean-square deviation between corresponding points of a and b, shape (L, 3).

    With ``superpose=True`` (default) ``a`` is first optimally superposed onto ``b`` by a
    proper rotation and translation (never a reflection); otherwise the coordinates are
    compared as they are.
    """
    a, b = _pair(a, b)
    if superpose:
        rot, trans = _kabsch_batch(a, b, np.ones((1, len(a))))
        a = a @ rot[0].T + trans[0]
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1)))) if len(a) else 0.0


def mirror_rmsd(a, b) -> float:
    """RMSD after superposing the mirror image of ``a`` (x -> -x) onto ``b``.

    A diagnostic, never used silently: ``mirror_rmsd(a, b) < rmsd(a, b)`` means ``a`` has the
    handedness opposite to ``b``.
    """
    a, b = _pair(a, b)
    return rmsd(a * np.array([-1.0, 1.0, 1.0]), b)


def d0(length: int) -> float:
    """TM-score distance scale for a reference of ``length`` residues, Angstrom:
    1.24 (L - 15)^(1/3) - 1.8 for L > 21, else 0.5 (as the TM-score program; never below 0.5)."""
    if length <= 21:
        return 0.5
    return max(1.24 * (length - 15) ** (1.0 / 3.0) - 1.8, 0.5)


def tm_score(
    model,
    reference,
    superpose: bool = True,
    align: bool = False,
    sequences: tuple[str, str] | None = None,
) -> float:
    """TM-score of ``model`` against ``reference``, normalised by the reference length.

    TM = (1 / L_ref) sum_i 1 / (1 + (d_i / d0)^2), with d0 = :func:`d0` (L_ref).

    Parameters
    ----------
    model, reference : array_like, shape (L, 3) and (L_ref, 3)
        Usually CA (or Cb) coordinates.
    superpose : bool
        Fixed residue correspondence (``align=False``): True (default) maximises the score over
        proper rigid superpositions with the TM-score program's heuristic search: Kabsch
        superpositions seeded on fragments of L, L/2, L/4, ... (down to 4) residues placed every
        half fragment length, each extended iteratively to the residues within
        d0_search = clip(d0, 4.5, 8) Angstrom (at most 20 rounds), keeping the best score.
        False scores the coordinates as given.
    align : bool
        Sequence-independent structural alignment by TM-align (``tmtools.tm_align``); the
        lengths may then differ. ``superpose`` is ignored.
    sequences : (str, str), optional
        Sequences passed to TM-align (default: poly-glycine); only used with ``align=True``.

    Returns
    -------
    float
        In (0, 1]; 1 for identical structures.
    """
    if align:
        import tmtools

        x = _as_coords(model, "model")
        y = _as_coords(reference, "reference")
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError("coordinates contain NaN or infinity")
        sx, sy = sequences or ("G" * len(x), "G" * len(y))
        return float(tmtools.tm_align(x, y, sx, sy).tm_norm_chain2)
    a, b = _pair(model, reference)
    length = len(b)
    if length == 0:
        return 0.0
    scale = d0(length)
    if not superpose:
        return float(np.sum(1.0 / (1.0 + np.sum((a - b) ** 2, axis=1) / scale**2)) / length)
    return _tm_search(a, b, scale)


def _tm_search(a: np.ndarray, b: np.ndarray, scale: float, n_iter: int = 20) -> float:
    """The TM-score program's superposition search on a fixed correspondence (vectorised over
    the seed fragments of each length)."""
    length = len(a)
    d_search = min(max(scale, 4.5), 8.0)
    smallest = min(4, length)
    sizes = []  # the TM-score program's seed lengths: L, L/2, ... (5 at most), then 4
    for k in range(5):
        size = length >> k
        if size <= smallest:
            break
        sizes.append(size)
    sizes.append(smallest)
    best = 0.0
    idx = np.arange(length)
    for size in sizes:
        step = max(1, size // 2)
        starts = np.arange(0, length - size + 1, step)
        if starts[-1] != length - size:
            starts = np.append(starts, length - size)
        weights = (
            (idx[None, :] >= starts[:, None]) & (idx[None, :] < starts[:, None] + size)
        ).astype(np.float64)
        active = np.ones(len(starts), dtype=bool)
        for _ in range(n_iter):
            rot, trans = _kabsch_batch(a, b, weights[active])
            moved = np.einsum("lj,sij->sli", a, rot) + trans[:, None, :]
            dist2 = np.sum((moved - b[None]) ** 2, axis=2)  # (S, L)
            scores = np.sum(1.0 / (1.0 + dist2 / scale**2), axis=1) / length
            best = max(best, float(scores.max()))
            # next selection: residues within d_search, widened by 0.5 A until >= 3 are in
            cutoff = np.full(len(dist2), d_search)
            sel = dist2 < cutoff[:, None] ** 2
            for _ in range(200):
                few = sel.sum(axis=1) < min(3, length)
                if not few.any():
                    break
                cutoff[few] += 0.5
                sel[few] = dist2[few] < cutoff[few, None] ** 2
            new = sel.astype(np.float64)
            changed = np.any(new != weights[active], axis=1)
            rows = np.flatnonzero(active)
            weights[rows] = new
            active[rows[~changed]] = False
            if not active.any():
                break
    return best


def lddt(
    pred,
    ref,
    cutoff: float = 15.0,
    thresholds: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0),
    per_residue: bool = False,
) -> float | np.ndarray:
    """lDDT of ``pred`` against ``ref`` on one atom per residue (e.g. Cb), superposition-free.

    Every pair i != j with reference distance < ``cutoff`` is scored by the fraction of
    ``thresholds`` that |d_pred - d_ref| falls below; the global score averages over all such
    pairs (as OpenStructure and AlphaFold), ``per_residue=True`` returns each residue's score
    (NaN for a residue with no partner within the cutoff).

    Parameters
    ----------
    pred, ref : array_like, shape (L, 3)
    cutoff : float
        Inclusion radius in the reference, Angstrom.
    thresholds : tuple of float
        Distance-difference thresholds, Angstrom.

    Returns
    -------
    float in [0, 1], or ndarray (L,)
    """
    a, b = _pair(pred, ref)
    dp, dr = pairwise_distances(a), pairwise_distances(b)
    mask = dr < cutoff
    np.fill_diagonal(mask, False)
    err = np.abs(dp - dr)
    kept = np.zeros_like(dr)
    for thr in thresholds:
        kept += err < thr
    kept /= len(thresholds)
    kept *= mask
    if per_residue:
        n = mask.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, kept.sum(axis=1) / np.maximum(n, 1), np.nan)
    total = mask.sum()
    return float(kept.sum() / total) if total else 0.0


def distance_mae(truth, decoded, dmax: float, mask=None) -> float:
    """Mean |d_decoded - d_true| over the residue pairs i > j of channel 0, in Angstrom.

    Distances are read from the images' lower triangle as d = (x + 1) / 2 * dmax
    (:func:`protoken.codec.image_to_distances`), the decoded image clipped to [-1, 1] first.
    Batches are pooled: the mean runs over every valid pair of every image.

    Parameters
    ----------
    truth, decoded : array_like, shape (3, L, L) or (B, 3, L, L)
        Images in [-1, 1] (channels first), e.g. an input and its decoding by a tokenizer.
    dmax : float
        The images' distance cut-off, Angstrom.
    mask : array_like of bool, shape (L, L) or (B, L, L), optional
        Valid pixels (False on padding); default all.

    Returns
    -------
    float
        0.0 when there is no pair.
    """
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(decoded, dtype=np.float64)
    if t.shape != p.shape or t.ndim not in (3, 4) or t.shape[-1] != t.shape[-2]:
        raise ValueError(
            f"expected two images of one shape (3, L, L) or (B, 3, L, L), got {t.shape}, {p.shape}"
        )
    ch_t, ch_p = t[..., 0, :, :], p[..., 0, :, :]
    pairs = np.tri(t.shape[-1], k=-1, dtype=bool)
    if mask is not None:
        pairs = pairs & np.asarray(mask, dtype=bool)
    pairs = np.broadcast_to(pairs, ch_t.shape)
    if not pairs.any():
        return 0.0
    d_true = (ch_t[pairs] + 1.0) / 2.0 * dmax
    d_dec = (np.clip(ch_p[pairs], -1.0, 1.0) + 1.0) / 2.0 * dmax
    return float(np.mean(np.abs(d_dec - d_true)))


# --------------------------------------------------------------------------- complexes

#: How to install DockQ beside numpy 2 (its release pins numpy<2 but runs on 2).
DOCKQ_INSTALL = (
    "pip install 'protoken[complex]' && "
    "pip install --no-deps --no-build-isolation --no-cache-dir 'dockq>=2.1.3'"
)

#: Chain ids of the temporary files DockQ reads (one character each, as PDB columns allow).
_DOCKQ_IDS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def complex_scores(
    pred_atoms: dict,
    true_atoms: dict,
    chains,
    sequence: str | None = None,
    tm_atom: str = "CB",
    dockq: bool = True,
) -> dict:
    """A complex against its true structure, on the known residue correspondence.

    Parameters
    ----------
    pred_atoms, true_atoms : dict of str to array_like (L, 3)
        Atom name -> coordinates (Angstrom), one row per residue, residues in the same order
        (e.g. a reconstruction's ``atoms`` and the true ``N``, ``CA``, ``C`` with their virtual
        ``CB``). The atoms both hold are used.
    chains : sequence of (str, int)
        The chain layout, (chain id, residues) per chain in residue order
        (``Backbone.chains``); the counts sum to L.
    sequence : str, optional
        One-letter sequence (residue names of DockQ's files; default UNK).
    tm_atom : str
        The atom of the TM-scores (``"CB"``: the image's own atom, as ``tm_score`` elsewhere).
    dockq : bool
        Score the interfaces with DockQ (needs the ``DockQ`` package and N, CA, C).

    Returns
    -------
    dict
        ``complex_tm_score``: TM-score of all residues together, d0 of the total length, on the
        fixed correspondence (maximised over superpositions, no re-alignment: a chain placed
        wrongly relative to the others costs its share); ``chain_tm_scores`` (chain id ->
        TM-score of the chain superposed on its own), ``chain_tm_min``, ``chain_tm_mean``;
        with ``dockq`` and two chains or more: ``interfaces`` (pairs of chains in contact in
        the truth: a residue pair within 5 A), per interface ``interface_scores``
        (``"A/B"`` -> ``dockq``, ``fnat``, ``irmsd``, ``lrmsd``) and their means ``dockq``
        (DockQ's GlobalDockQ), ``fnat``, ``irmsd``, ``lrmsd`` (NaN when no chains touch).

    Notes
    -----
    DockQ (``DockQ.DockQ.run_on_all_native_interfaces`` on temporary PDB files, chain i of
    the prediction mapped to chain i of the truth, residues matched by number) sees the atoms
    given: with N, CA, C and CB, its contacts (fnat: residue pairs with atoms within 5 A) are
    backbone and Cb contacts, not the all-heavy-atom contacts of published DockQ values; its
    interface and ligand RMSDs are on N, CA, C (and O when both hold it), as DockQ's own.

    Raises
    ------
    ValueError
        Shapes or layout do not match, non-finite coordinates, or DockQ without N, CA, C.
    ImportError
        ``dockq=True`` without the DockQ package (``pip install 'protoken[complex]'``).
    """
    names = [k for k in pred_atoms if k in true_atoms]
    if not names:
        raise ValueError("the two structures share no atom name")
    pred = {k: _as_coords(pred_atoms[k], f"pred {k}") for k in names}
    true = {k: _as_coords(true_atoms[k], f"true {k}") for k in names}
    length = len(true[names[0]])
    for k in names:
        _pair(pred[k], true[k])
        if len(true[k]) != length:
            raise ValueError(f"atom {k}: {len(true[k])} residues, not {length}")
    layout = [(str(c), int(n)) for c, n in chains]
    if sum(n for _, n in layout) != length or any(n < 1 for _, n in layout):
        raise ValueError(f"chain layout {layout} does not cover {length} residues")
    atom = tm_atom if tm_atom in names else ("CA" if "CA" in names else names[0])
    out: dict = {"complex_tm_score": tm_score(pred[atom], true[atom])}
    per_chain = {}
    start = 0
    for cid, n in layout:
        per_chain[cid] = tm_score(pred[atom][start : start + n], true[atom][start : start + n])
        start += n
    out["chain_tm_scores"] = per_chain
    out["chain_tm_min"] = float(min(per_chain.values()))
    out["chain_tm_mean"] = float(np.mean(list(per_chain.values())))
    if dockq and len(layout) >= 2:
        out.update(_dockq(pred, true, layout, sequence))
    return out


def _dockq(pred: dict, true: dict, layout: list, sequence: str | None) -> dict:
    """DockQ over every interface of the truth (see :func:`complex_scores`)."""
    import tempfile

    try:
        from DockQ import DockQ as dq
    except ImportError:
        raise ImportError(f"interface scores need the DockQ package: {DOCKQ_INSTALL}") from None
    from protoken.structure import structure_to_text

    if not {"N", "CA", "C"} <= set(pred):
        raise ValueError("DockQ needs N, CA and C of both structures (reconstruct the backbone)")
    if len(layout) > len(_DOCKQ_IDS):
        raise ValueError(f"DockQ scores complexes of at most {len(_DOCKQ_IDS)} chains")
    order = [k for k in ("N", "CA", "C", "O", "CB") if k in pred]
    ids = _DOCKQ_IDS[: len(layout)]
    internal = [(ids[i], n) for i, (_, n) in enumerate(layout)]
    real = {ids[i]: cid for i, (cid, _) in enumerate(layout)}
    with tempfile.TemporaryDirectory(prefix="protoken-dockq-") as tmp:
        paths = []
        for name, atoms in (("model", pred), ("native", true)):
            path = os.path.join(tmp, f"{name}.pdb")
            with open(path, "w") as fh:
                fh.write(structure_to_text({k: atoms[k] for k in order}, sequence,
                                           chains=internal))  # fmt: skip
            paths.append(path)
        model, native = (dq.load_PDB(p) for p in paths)
        try:
            results, _ = dq.run_on_all_native_interfaces(
                model, native, chain_map={c: c for c in ids}, no_align=True
            )
        finally:  # DockQ memoises on chain ids and file names: never reuse a result
            for fn in ("run_on_chains", "align_chains", "format_alignment", "subset_atoms"):
                cached = getattr(dq, fn, None)
                if hasattr(cached, "cache_clear"):
                    cached.cache_clear()
    per = {}
    for info in results.values():
        key = f"{real[info['chain1']]}/{real[info['chain2']]}"
        per[key] = {"dockq": float(info["DockQ"]), "fnat": float(info["fnat"]),
                    "irmsd": float(info["iRMSD"]), "lrmsd": float(info["LRMSD"])}  # fmt: skip
    out: dict = {"interfaces": len(per), "interface_scores": per}
    for key in ("dockq", "fnat", "irmsd", "lrmsd"):
        out[key] = float(np.mean([v[key] for v in per.values()])) if per else float("nan")
    return out
