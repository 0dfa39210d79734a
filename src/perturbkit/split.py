"""Splits return integer indices into the AnnData; callers take ``adata[idx].copy()``."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field

import numpy as np

from .data import PerturbSpec, validate


@dataclass(frozen=True)
class Split:
    """Train / source / target cell indices of one prediction task.

    ``source`` are the control cells whose perturbed state is predicted; ``target`` are the real perturbed
    cells the prediction is scored against. ``train`` never contains a ``target`` cell.
    """

    train: np.ndarray
    source: np.ndarray
    target: np.ndarray
    name: str
    info: dict = field(default_factory=dict)

    def fingerprint(self, obs_names=None) -> str:
        """sha256 (16 hex) of the three index sets (and the cell names when given)."""
        h = hashlib.sha256()
        for part in (self.train, self.source, self.target):
            h.update(np.asarray(part, dtype=np.int64).tobytes())
            h.update(b"|")
        if obs_names is not None:
            for idx in (self.train, self.source, self.target):
                h.update("\n".join(np.asarray(obs_names)[idx]).encode())
        return h.hexdigest()[:16]

    def subsets(self, adata):
        """(train, source, target) AnnData copies; of a file opened on disk (:class:`perturbkit.ondisk.OnDisk`)
        the training cells as a view that stays on disk and the source and target read into memory
        (:func:`cells`)."""
        return (cells(adata, self.train, in_memory=False), cells(adata, self.source), cells(adata, self.target))

    def to_dict(self, obs_names=None) -> dict:
        return {
            "name": self.name,
            "n_train": int(len(self.train)),
            "n_source": int(len(self.source)),
            "n_target": int(len(self.target)),
            "fingerprint": self.fingerprint(obs_names),
            **self.info,
        }


def cells(adata, rows, *, in_memory: bool = True):
    """The cells ``rows`` of ``adata`` in memory: an AnnData copy (``adata[rows].copy()``; of a file opened on
    disk, its rows read). ``in_memory=False`` and a file opened on disk (:class:`perturbkit.ondisk.OnDisk`): a
    :class:`~perturbkit.ondisk.View` of those rows whose X stays on disk (the training cells, which the models
    read in batches); an AnnData is copied all the same."""
    from .ondisk import OnDisk

    if isinstance(adata, OnDisk):
        view = adata[rows]
        return view.to_memory() if in_memory else view
    return adata[rows].copy()


def holdout_cell_type(adata, spec: PerturbSpec, holdout: str, *, min_cells: int = 3) -> Split:
    """The scGen / scPRAM protocol: train on every cell except the perturbed cells of ``holdout``.

    source = the control cells of ``holdout``; target = its perturbed cells. This is :func:`holdout_context`
    (a two-condition data set is a screen of one perturbation).
    """
    return holdout_context(adata, spec, holdout, min_cells=min_cells)


def holdout_context(adata, spec: PerturbSpec, context: str, *, min_cells: int = 3) -> Split:
    """Context transfer: hold out the perturbed cells of one context; predict every perturbation in it.

    train = every cell of the requested perturbations and the controls, except the perturbed cells of
    ``context`` (its control cells train too); source = the control cells of ``context``; target = its
    perturbed cells of every perturbation that has at least ``min_cells`` cells there and cells in another
    context (the others are skipped, with the reason in ``info["skipped"]`` and an
    :class:`~perturbkit.errors.InputWarning`). With one perturbation this is the scGen / scPRAM protocol, and
    :func:`~perturbkit.data.validate` names what the held-out context lacks.
    """
    from .errors import InputError

    validate(adata, spec, holdout=context, min_cells=min_cells)
    cond, ctx = _labels(adata, spec.condition_key), _labels(adata, spec.context_key)
    if context not in set(ctx):
        from .errors import choices_text, suggest

        raise InputError(f"holdout {context!r} is not a value of obs[{spec.context_key!r}].{suggest(context, ctx)} "
                         f"Values: {choices_text(set(ctx))}.", params=("holdout",))
    in_ctx = ctx == context
    source = np.flatnonzero(in_ctx & (cond == spec.control))
    if len(source) < min_cells:
        raise InputError(f"holdout {context!r} has {len(source)} control cells; at least {min_cells} are needed "
                         "to predict from.", params=("holdout",))
    requested = spec.perturbations(adata)
    kept, skipped = [], {}
    for p in requested:
        n_here, n_elsewhere = int((in_ctx & (cond == p)).sum()), int((~in_ctx & (cond == p)).sum())
        if n_here < min_cells:
            skipped[p] = f"{n_here} cells in {context!r} (fewer than {min_cells} to score)"
        elif n_elsewhere == 0:
            skipped[p] = f"no cells in any other context (nothing to learn its response from)"
        else:
            kept.append(p)
    _report_skipped(skipped, f"holdout {context!r}")
    if not kept:
        raise InputError(f"holdout {context!r}: no requested perturbation can be predicted there: "
                         + "; ".join(f"{p}: {why}" for p, why in skipped.items()), params=("holdout",))
    is_req = np.isin(cond, requested)
    target = np.flatnonzero(in_ctx & np.isin(cond, kept))
    train = np.flatnonzero((is_req | (cond == spec.control)) & ~(in_ctx & is_req))
    return Split(train=train, source=source, target=target, name=f"holdout:{context}",
                 info={"holdout": context, "scenario": "holdout_context", "perturbations": kept,
                       "skipped": skipped})


def holdout_combination(adata, spec: PerturbSpec, combination: str, *, min_cells: int = 3) -> Split:
    """Unseen combination: hold out every cell of ``combination`` (``"A+B"``, in every context it occurs) and
    predict it from the control cells of those contexts; its singles (``A``, ``B``) and every other requested
    perturbation train."""
    from .errors import InputError

    validate(adata, spec)
    cond, ctx = _labels(adata, spec.condition_key), _labels(adata, spec.context_key)
    requested = spec.perturbations(adata)
    if not spec.is_combination(combination):
        raise InputError(f"holdout combination {combination!r} holds no {spec.combo_delimiter!r}: it is not a "
                         "combination of perturbations.", params=("combo_delimiter",))
    if combination not in requested:
        raise InputError(f"holdout combination {combination!r} is not one of the requested perturbations "
                         f"{requested[:6]}{' ...' if len(requested) > 6 else ''}; pass perturbed='all' or a list "
                         "with the combination and its singles.", params=("perturbed",))
    missing = [s for s in spec.singles(combination) if s not in requested or not (cond == s).any()]
    if missing:
        raise InputError(f"holdout combination {combination!r}: its single perturbation(s) {missing} have no "
                         "cells among the requested perturbations, so the combination cannot be composed from "
                         "them. Choose a combination whose singles were measured, and pass perturbed='all' or a "
                         "list with the combination and its singles.", params=("perturbed",))
    is_combo = cond == combination
    if int(is_combo.sum()) < min_cells:
        raise InputError(f"holdout combination {combination!r} has {int(is_combo.sum())} cells; at least "
                         f"{min_cells} are needed.", params=("perturbed",))
    contexts = sorted(set(ctx[is_combo]))
    source = np.flatnonzero(np.isin(ctx, contexts) & (cond == spec.control))
    if len(source) < min_cells:
        raise InputError(f"holdout combination {combination!r}: its contexts {contexts} have {len(source)} control "
                         "cells to predict from.", params=("perturbed",))
    train = np.flatnonzero((np.isin(cond, requested) | (cond == spec.control)) & ~is_combo)
    return Split(train=train, source=source, target=np.flatnonzero(is_combo), name=f"combination:{combination}",
                 info={"combination": combination, "scenario": "holdout_combination", "contexts": contexts,
                       "singles": list(spec.singles(combination)), "perturbations": [combination]})


def _report_skipped(skipped: dict[str, str], where: str) -> None:
    if skipped:
        import warnings

        from .errors import InputWarning

        warnings.warn(f"{where}: {len(skipped)} perturbation(s) skipped: "
                      + "; ".join(f"{p} ({why})" for p, why in skipped.items()), InputWarning, stacklevel=3)


def _labels(adata, key: str) -> np.ndarray:
    return adata.obs[key].astype(str).to_numpy()


def _donors(adata, spec: PerturbSpec) -> np.ndarray:
    """Each cell's donor label (``spec.donor_key``), or a clear error when there is no donor column."""
    from .errors import InputError

    if spec.donor_key is None:
        raise InputError("cross_donor needs spec.donor_key: the obs column of the donor (batch, study).")
    if spec.donor_key not in adata.obs.columns:
        raise InputError(f"donor_key {spec.donor_key!r} is not an obs column.")
    return _labels(adata, spec.donor_key)


def donor_folds(adata, spec: PerturbSpec, n_folds: int = 2, *, seed: int = 0) -> list[tuple[str, ...]]:
    """Partition the donors (``spec.donor_key``) into ``n_folds`` seeded groups of test donors.

    The donors are sorted, shuffled with ``numpy.random.default_rng(seed)`` and dealt round-robin, so every
    donor is a test donor in exactly one fold. Each group is returned sorted.
    """
    from .errors import InputError

    donors = sorted(set(_donors(adata, spec)))
    if not isinstance(n_folds, int) or isinstance(n_folds, bool) or n_folds < 2 or n_folds > len(donors):
        raise InputError(f"cross_donor folds must be an integer from 2 to the number of donors ({len(donors)}), "
                         f"got {n_folds!r}.")
    order = np.random.default_rng(seed).permutation(len(donors))
    return [tuple(sorted(donors[i] for i in order[k::n_folds])) for k in range(n_folds)]


def cross_donor(adata, spec: PerturbSpec, holdout: str, test_donors, *, train_donors=None,
                context_seen: bool = True, test_controls_in_train: bool = True, min_cells: int = 3) -> Split:
    """Train on some donors; predict the perturbed ``holdout`` cells of the other donors from their controls.

    ``source`` = the control cells of ``holdout`` in ``test_donors``; ``target`` = the perturbed cells of
    ``holdout`` in ``test_donors``. ``train`` = every control and perturbed cell of ``train_donors`` (default:
    all donors not in ``test_donors``), plus the control cells of the test donors when
    ``test_controls_in_train`` (as scGen's cross-study prediction, which trains on the other study's controls).
    With ``context_seen=False`` the perturbed ``holdout`` cells of the training donors are left out as well,
    so neither the donors nor the context's response are seen (leave-one-context-out across donors).
    The test donors' perturbed cells are never in ``train``.
    """
    from .errors import InputError, choices_text, suggest

    validate(adata, spec, holdout=holdout, min_cells=min_cells)
    donor = _donors(adata, spec)
    known = set(donor)
    test = [str(d) for d in ([test_donors] if isinstance(test_donors, str) else test_donors)]
    train = sorted(known - set(test)) if train_donors is None else [str(d) for d in (
        [train_donors] if isinstance(train_donors, str) else train_donors)]
    for what, group in (("test_donors", test), ("train_donors", train)):
        if not group:
            raise InputError(f"cross_donor: {what} is empty; name at least one donor.")
        for d in group:
            if d not in known:
                raise InputError(f"cross_donor: {what} names {d!r}, which is not a value of "
                                 f"obs[{spec.donor_key!r}].{suggest(d, known)} Donors: {choices_text(known)}.")
    both = set(test) & set(train)
    if both:
        raise InputError(f"cross_donor: donor(s) {sorted(both)} are in both test_donors and train_donors.")
    cond = _labels(adata, spec.condition_key)
    ctx = _labels(adata, spec.context_key)
    in_test, in_train = np.isin(donor, test), np.isin(donor, train)
    is_ctrl, is_pert, in_ctx = cond == spec.control, cond == spec.perturbed, ctx == holdout
    source = np.flatnonzero(in_test & in_ctx & is_ctrl)
    target = np.flatnonzero(in_test & in_ctx & is_pert)
    for idx, what in ((source, "control"), (target, "perturbed")):
        if len(idx) < min_cells:
            raise InputError(f"cross_donor: the test donors {test} have {len(idx)} {what} {holdout!r} cells; at "
                             f"least {min_cells} are needed. Choose other test donors or another context.")
    keep = in_train & (is_ctrl | is_pert)
    if not context_seen:
        keep &= ~(in_ctx & is_pert)
    if test_controls_in_train:
        keep |= in_test & is_ctrl
    train_idx = np.flatnonzero(keep)
    paired = set(ctx[train_idx][is_ctrl[train_idx]]) & set(ctx[train_idx][is_pert[train_idx]])
    if not paired:
        raise InputError(f"cross_donor: no context has both conditions in the training donors {train}; no "
                         "response can be learned.")
    name = f"cross_donor:{holdout}|test={'+'.join(test)}"
    return Split(train=train_idx, source=source, target=target, name=name,
                 info={"holdout": holdout, "scenario": "cross_donor", "test_donors": test, "train_donors": train,
                       "context_seen": bool(context_seen), "test_controls_in_train": bool(test_controls_in_train)})


def unbalanced(adata, spec: PerturbSpec, keep_fraction: float, *, contexts=None, seed: int = 0,
               protect: str | None = None) -> np.ndarray:
    """Indices of a seeded unbalanced copy: keep ``keep_fraction`` of the perturbed cells of ``contexts``.

    ``contexts=None`` thins every context. Within each thinned context, ``round(n * keep_fraction)`` perturbed
    cells (at least one) are drawn without replacement by ``numpy.random.default_rng([seed, crc32(context)])``
    (so a context's draw does not depend on the others); control cells
    and the perturbed cells of other contexts are all kept. The perturbed cells of ``protect`` (e.g. the
    held-out context, so that the evaluation target stays the same as in the balanced run) are never thinned.
    Returns sorted integer indices; take ``adata[idx].copy()``.
    """
    from .errors import InputError, choices_text, suggest

    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float)) or not 0 < keep_fraction <= 1:
        raise InputError(f"unbalanced: keep_fraction must be a number in (0, 1], got {keep_fraction!r}.")
    cond = _labels(adata, spec.condition_key)
    ctx = _labels(adata, spec.context_key)
    known = sorted(set(ctx))
    chosen = known if contexts is None else [str(c) for c in ([contexts] if isinstance(contexts, str) else contexts)]
    for c in chosen:
        if c not in known:
            raise InputError(f"unbalanced: context {c!r} is not a value of obs[{spec.context_key!r}]."
                             f"{suggest(c, known)} Values: {choices_text(known)}.")
    keep = np.ones(adata.n_obs, dtype=bool)
    for c in chosen:
        if c == protect:
            continue
        idx = np.flatnonzero((ctx == c) & (cond == spec.perturbed))
        if len(idx) == 0:
            continue
        # one generator per context, so a context's draw does not depend on which others are thinned
        rng = np.random.default_rng([int(seed), zlib.crc32(c.encode())])
        n_keep = max(1, int(round(len(idx) * keep_fraction)))
        keep[np.setdiff1d(idx, rng.choice(idx, size=n_keep, replace=False))] = False
    return np.flatnonzero(keep)
