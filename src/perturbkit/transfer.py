"""Reference -> query transfer: train on one data set, predict another study's control cells.

The query is one more source of the same task shape (:class:`perturbkit.split.Split`): :func:`prepare` returns
one AnnData holding the reference cells (the training cells) followed by the query cells, and
:func:`query_splits` cuts it into one split per query context (train: every reference cell; source: the
query's control cells of the context; target: its perturbed cells, the truth, where the query has any). Every
verb then fits and predicts through :func:`perturbkit.engine.fit_predict` as usual.

Steps of :func:`prepare`:

1. the query's obs are harmonised to the reference's keys and labels (:class:`QueryKeys`: the query's own
   condition / context columns and control / perturbed labels, where they differ); only its control and
   perturbed cells are kept;
2. both are preprocessed the same way: the reference by :func:`perturbkit.data.preprocess` (per-cell
   normalisation, log1p, its highly variable genes); the query normalised per cell over all its own genes with
   the reference's decision and target sum, then restricted to the reference's genes, matched by name;
3. genes the query lacks are dropped from both (reported; a query holding fewer than ``min_shared`` of the
   reference's genes stops with an :class:`~perturbkit.errors.InputError`);
4. optional integration (:data:`INTEGRATIONS`), in expression space: ``combat`` is scanpy's ComBat
   (:func:`scanpy.pp.combat`, batch = study) estimated on the control cells of both studies and applied, as
   the per-gene affine map it is, to every cell of each study (negative values set to 0); ``scvi`` is
   scvi-tools' SCVI trained on the counts of both studies, every cell decoded in the reference batch
   (:func:`scvi_expression`); the models then train and predict in the corrected space, and the truth is
   scored in the same space;
5. the batch mixing of the two studies (:func:`perturbkit.metrics.knn_batch_entropy` on a PCA of the
   matrix the models see) before and after integration.

:func:`pseudo_study` builds a query with a documented technical shift from a count matrix (the ``cross_study``
bench scenario; docs/cross_study.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import InputError, choices_text, suggest
from .spec import PerturbSpec, Preprocessing

#: the integration methods (``--integrate``); where the prediction is made: docs/cross_study.md
INTEGRATIONS = ("none", "combat", "scvi")
#: obs column of the combined AnnData naming each cell's study
STUDY_KEY = "perturbkit_study"
REFERENCE, QUERY = "reference", "query"
#: the default smallest share of the reference's genes the query must hold
MIN_SHARED = 0.5


@dataclass(frozen=True)
class QueryKeys:
    """The query's obs keys and labels where they differ from the reference's (None: the reference's)."""

    condition_key: str | None = None
    control: str | None = None
    perturbed: str | None = None
    context_key: str | None = None

    def resolve(self, spec: PerturbSpec) -> dict[str, Any]:
        """The query's condition_key, control, perturbed and context_key (the reference's where unset)."""
        return {k: getattr(self, k) if getattr(self, k) is not None else getattr(spec, k)
                for k in ("condition_key", "control", "perturbed", "context_key")}

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("condition_key", "control", "perturbed", "context_key")}


@dataclass
class Transfer:
    """The prepared reference + query: ``adata`` (reference cells first, then the query's; obs[STUDY_KEY]
    says which), the spec (the reference's), and ``info`` (genes, preprocessing, integration, mixing)."""

    adata: Any
    spec: PerturbSpec
    info: dict[str, Any]

    @property
    def n_reference(self) -> int:
        return int((self.adata.obs[STUDY_KEY] == REFERENCE).sum())


def check_integration(method: str) -> str:
    if method not in INTEGRATIONS:
        raise InputError(f"integrate {method!r} is not an integration method.{suggest(method, INTEGRATIONS)} "
                         f"Choose one of {choices_text(INTEGRATIONS)}.", params=("integrate",))
    return method


def check_min_shared(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InputError(f"min_shared_genes must be a number in (0, 1], got {value!r}; e.g. 0.5 (the query "
                         "must hold half of the reference's genes).", params=("min_shared_genes",))
    return float(value)


def harmonise_query(query, spec: PerturbSpec, keys: QueryKeys, perturbations: list[str]):
    """A new AnnData of the query's control cells and its cells of the reference's ``perturbations``, with the
    reference's obs keys and labels (``spec.condition_key`` / ``spec.context_key`` hold them; the query's
    other obs columns are kept).

    The query's control label becomes ``spec.control``. With one perturbation, the query's perturbed label
    (``keys.perturbed``, default the reference's) becomes the reference's; with several, the query's labels
    are matched by name (``keys.perturbed`` cannot map several labels and must be unset). The query lacking
    its condition or context column, or its control label, raises :class:`InputError` naming the key, the
    value and the flag to fix it. A query without perturbed cells is allowed (nothing to score)."""
    from .data import check_matrix

    check_matrix(query, "query")
    q = keys.resolve(spec)
    obs = query.obs
    for name, flag in (("condition_key", "query_condition_key"), ("context_key", "query_context_key")):
        if q[name] not in obs.columns:
            raise InputError(f"query: {name} {q[name]!r} is not an obs column of the query."
                             f"{suggest(q[name], obs.columns)} Its obs columns: {choices_text(obs.columns)}. "
                             f"Name the query's column with {flag}.", params=(flag,))
    cond = obs[q["condition_key"]].astype(str).to_numpy()
    labels = sorted(set(cond))
    if q["control"] not in labels:
        raise InputError(f"query: control {q['control']!r} is not a value of the query's "
                         f"obs[{q['condition_key']!r}].{suggest(q['control'], labels)} Values: "
                         f"{choices_text(labels)}. Name the query's control label with query_control.",
                         params=("query_control",))
    rename = {q["control"]: spec.control}
    if len(perturbations) == 1:
        rename[str(q["perturbed"])] = perturbations[0]
    elif keys.perturbed is not None:
        raise InputError(f"query_perturbed {keys.perturbed!r} maps one label, but the reference has "
                         f"{len(perturbations)} perturbations; with several, the query's labels are matched by "
                         "name: drop query_perturbed.", params=("query_perturbed",))
    else:
        rename.update({p: p for p in perturbations})
    keep = np.isin(cond, list(rename))
    out = query[keep].copy()
    new = out.obs.copy()
    new[spec.condition_key] = [rename[c] for c in cond[keep]]
    new[spec.context_key] = out.obs[q["context_key"]].astype(str).to_numpy()
    for key in (spec.condition_key, spec.context_key):
        new[key] = new[key].astype(str).astype("category")
    out.obs = new
    return out


def shared_genes(ref_genes, query_genes, min_shared: float) -> tuple[list[str], list[str]]:
    """(the reference's genes the query holds, in the reference's order; those it lacks). Fewer than
    ``min_shared`` of the reference's genes shared raises :class:`InputError`."""
    from .data import examples

    ref = [str(g) for g in ref_genes]
    have = {str(g) for g in query_genes}
    shared = [g for g in ref if g in have]
    missing = [g for g in ref if g not in have]
    if len(shared) < min_shared * len(ref):
        raise InputError(
            f"query: shares {len(shared)} of the reference's {len(ref)} genes ({len(shared) / len(ref):.0%}), "
            f"fewer than min_shared_genes = {min_shared:g}; genes are matched by name (e.g. the reference has "
            f"{examples(ref, 3)[7:-1]}; the query {examples(sorted(have), 3)[7:-1] or 'none'}). Give the query "
            "the reference's kind of gene names (symbols vs Ensembl IDs: e.g. query.var_names = "
            "query.var['gene_symbols']) or lower min_shared_genes.", params=("min_shared_genes",))
    return shared, missing


def prepare(reference, query, spec: PerturbSpec, pp: Preprocessing = Preprocessing(), *,
            keys: QueryKeys = QueryKeys(), integrate: str = "none", min_shared: float = MIN_SHARED,
            seed: int = 0, scvi_epochs: int | None = None, log=print) -> Transfer:
    """Harmonise, preprocess (the reference's way, with its genes), match genes and integrate a reference and
    a query (raw or log-normalised, as :func:`perturbkit.data.preprocess` takes them); see the module
    docstring. ``scvi_epochs``: scVI's training epochs (None: scvi-tools' own rule). Neither input is
    modified."""
    import anndata as ad

    from . import data

    check_integration(integrate)
    min_shared = check_min_shared(min_shared)
    data.validate(reference, spec)
    perturbations = spec.perturbations(reference)
    q = harmonise_query(query, spec, keys, perturbations)
    ref_pp, ref_info = data.preprocess(reference, pp, log=log)
    normalised = any(s.startswith("normalize_total") for s in ref_info["steps"])
    q_pp, q_info = data.preprocess(q, replace(pp, normalize=normalised, n_top_genes=0),
                                   log=lambda m: log(f"query {m}"))
    shared, missing = shared_genes(ref_pp.var_names, q_pp.var_names, min_shared)
    n_query_genes = int(q.n_vars)
    if missing:
        log(f"query: {len(missing)} of the reference's {ref_pp.n_vars} genes are missing from the query and "
            f"are dropped{data.examples(missing)}; {len(shared)} genes remain")
    ref_pp, q_pp = ref_pp[:, shared].copy(), q_pp[:, shared].copy()
    ref_pp.obs[STUDY_KEY], q_pp.obs[STUDY_KEY] = REFERENCE, QUERY
    cols = [spec.condition_key, spec.context_key, STUDY_KEY]
    if spec.donor_key is not None:  # kept (a query without the column: its donor is "query")
        if spec.donor_key not in q_pp.obs.columns:
            q_pp.obs[spec.donor_key] = QUERY
        cols.append(spec.donor_key)
    both = ad.AnnData(X=_vstack(ref_pp.X, q_pp.X),
                      obs=_concat_obs(ref_pp.obs[cols], q_pp.obs[cols]),
                      var=ref_pp.var[[]].copy())
    for key in cols:
        both.obs[key] = both.obs[key].astype(str).astype("category")
    before = mixing(both, seed=seed)
    integ_info: dict[str, Any] = {"method": integrate}
    if integrate == "combat":
        both, integ_info = combat_on_controls(both, spec)
    elif integrate == "scvi":
        if not (data.looks_like_counts(reference.X) and data.looks_like_counts(q.X)):
            raise InputError("integrate 'scvi' models raw counts, but the reference or the query does not hold "
                             "counts (non-negative integers); give both as counts, or use integrate='combat'.",
                             params=("integrate",))
        counts = _vstack(reference[:, shared].X, q[:, shared].X)
        both, integ_info = scvi_expression(counts, both, seed=seed, max_epochs=scvi_epochs,
                                           target_sum=pp.target_sum, log=log)
    after = mixing(both, seed=seed) if integrate != "none" else before
    integ_info.update({"mixing_before": before, "mixing_after": after, "mixing": _MIXING_DEF})
    log(f"integration {integrate}: batch mixing (kNN batch entropy, 0-1) {before['score']:.3f}"
        + (f" -> {after['score']:.3f}" if integrate != "none" else ""))
    info = {
        "query_keys": keys.to_dict(),
        "reference": {"n_cells": int(ref_pp.n_obs), "preprocessing": ref_info},
        "query": {"n_cells": int(q_pp.n_obs), "n_genes": n_query_genes, "preprocessing": q_info,
                  "n_control": int((q_pp.obs[spec.condition_key] == spec.control).sum()),
                  "n_perturbed": int((q_pp.obs[spec.condition_key] != spec.control).sum())},
        "genes": {"reference": int(len(shared) + len(missing)), "shared": len(shared), "dropped": missing,
                  "min_shared_genes": min_shared},
        "integration": integ_info,
    }
    return Transfer(both, spec, info)


def _vstack(a, b):
    import scipy.sparse as sp

    if sp.issparse(a) or sp.issparse(b):
        return sp.vstack([sp.csr_matrix(a), sp.csr_matrix(b)]).tocsr().astype(np.float32)
    return np.vstack([np.asarray(a), np.asarray(b)]).astype(np.float32)


def _concat_obs(a, b):
    import pandas as pd

    out = pd.concat([a.astype(str), b.astype(str)])
    if not out.index.is_unique:  # the same barcode in both studies
        out.index = [f"{n}-{s}" for n, s in zip(out.index, out[STUDY_KEY])]
    return out


def combat_on_controls(adata, spec: PerturbSpec):
    """(ComBat-corrected copy of ``adata``, info): scanpy's ComBat (batch = obs[STUDY_KEY]) estimated on the
    control cells only, so that no perturbed cell (the query's truth) shapes the correction; ComBat's
    correction of a batch is an affine map per gene (x -> a x + c), which is read off the corrected controls
    and applied to every cell of that batch. A gene constant in a batch's controls is shifted only; values the
    correction makes negative are set to 0 (log expression; the share is recorded)."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    X = X.astype(np.float64)
    batch = adata.obs[STUDY_KEY].astype(str).to_numpy()
    ctrl = adata.obs[spec.condition_key].astype(str).to_numpy() == spec.control
    for b in sorted(set(batch)):
        if int((ctrl & (batch == b)).sum()) < 2:
            raise InputError(f"integrate 'combat': the {b} has {int((ctrl & (batch == b)).sum())} control cells; "
                             "ComBat is estimated on the control cells of each study and needs at least 2. "
                             "Use integrate='none'.", params=("integrate",))
    tmp = ad.AnnData(X=X[ctrl].copy(), obs=adata.obs.loc[ctrl, [STUDY_KEY]].astype(str))
    # ComBat divides by each gene's pooled variance: genes constant over the controls are left as they are
    varies = tmp.X.std(axis=0) > 0
    sub = tmp[:, varies].copy()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy's FutureWarnings of pandas internals
        sc.pp.combat(sub, key=STUDY_KEY)
    corrected = np.array(X[ctrl])
    corrected[:, varies] = np.asarray(sub.X)
    out = np.array(X)
    slopes = {}
    for b in sorted(set(batch)):
        rows_c = (batch[ctrl] == b)
        x, y = X[ctrl][rows_c], corrected[rows_c]
        mx, my = x.mean(axis=0), y.mean(axis=0)
        vx = ((x - mx) ** 2).mean(axis=0)
        cov = ((x - mx) * (y - my)).mean(axis=0)
        a = np.where(vx > 0, cov / np.where(vx > 0, vx, 1.0), 1.0)
        a = np.where(np.isfinite(a), a, 1.0)
        c = my - a * mx
        c = np.where(np.isfinite(c), c, 0.0)
        rows = batch == b
        out[rows] = X[rows] * a + c
        slopes[b] = {"median_scale": float(np.median(a)), "median_shift": float(np.median(c))}
    # log expression is >= 0, and every model and metric checks that it is: negative corrected values are 0
    negative = out < 0
    out[negative] = 0.0
    new = adata.copy()
    new.X = out.astype(np.float32)
    info = {"method": "combat", "implementation": "scanpy.pp.combat (batch = study), estimated on the control "
            "cells of both studies; each study's per-gene affine correction applied to all its cells",
            "n_genes_corrected": int(varies.sum()), "per_study": slopes,
            "share_clipped_at_0": float(negative.mean()),
            "space": "ComBat-corrected log-normalised expression (models train, predict and are scored there)"}
    return new, info


def scvi_expression(counts, adata, *, seed: int = 0, max_epochs: int | None = None, target_sum: float = 1e4,
                    log=print):
    """(a copy of ``adata`` whose X is scVI's batch-corrected expression, info): an scvi-tools ``SCVI`` model
    (its defaults; batch = obs[STUDY_KEY]) trained on the raw ``counts`` (cells x genes, the rows and genes of
    ``adata``) of every cell of both studies, as the tutorial did, then every cell decoded as if measured in
    the reference (``get_normalized_expression(transform_batch="reference", library_size=target_sum)``) and
    log1p-transformed: log-normalised expression again, so the models and metrics run on genes as without
    integration. Unlike ``combat_on_controls``, scVI sees the query's perturbed cells (their expression, not
    their labels). ``scvi.settings.seed = seed`` seeds it."""
    import anndata as ad
    import scipy.sparse as sp

    try:
        import scvi
    except ImportError:
        raise InputError("integrate 'scvi' needs scvi-tools, which is not installed: pip install scvi-tools "
                         "(docs/cross_study.md), or use integrate='combat'.", params=("integrate",)) from None
    import logging
    import warnings

    scvi.settings.seed = int(seed)
    tmp = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=adata.obs[[STUDY_KEY]].astype(str).copy())
    tmp.obs_names = adata.obs_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lightning's advice on workers and GPUs
        for name in ("lightning", "lightning.pytorch", "scvi"):
            logging.getLogger(name).setLevel(logging.ERROR)
        scvi.model.SCVI.setup_anndata(tmp, batch_key=STUDY_KEY)
        model = scvi.model.SCVI(tmp)
        model.train(max_epochs=max_epochs, accelerator="cpu", enable_progress_bar=False)
        expr = model.get_normalized_expression(tmp, transform_batch=REFERENCE, library_size=float(target_sum),
                                               return_numpy=True)
    epochs = len(model.history["elbo_train"]) if "elbo_train" in model.history else max_epochs
    log(f"integration scvi: scvi-tools {scvi.__version__}, {epochs} epochs on {tmp.n_obs} cells")
    new = adata.copy()
    new.X = np.log1p(np.asarray(expr, dtype=np.float64)).astype(np.float32)
    info = {"method": "scvi", "implementation": f"scvi-tools {scvi.__version__} SCVI (defaults; batch = study) "
            "trained on the raw counts of every cell of both studies; every cell decoded in the reference batch "
            f"(get_normalized_expression, library_size={target_sum:g}) and log1p-transformed",
            "epochs": int(epochs), "seed": int(seed),
            "space": "scVI's decoded expression in the reference batch, log1p (models train, predict and are "
                     "scored there)"}
    return new, info


_MIXING_DEF = ("kNN batch entropy: for each of up to 3000 cells (seeded draw), the Shannon entropy of the "
               "study labels of its 30 nearest neighbours (Euclidean, 30 PCs of the matrix the models see), "
               "divided by log(number of studies) and averaged: 0 = the studies do not mix, 1 = every "
               "neighbourhood holds the studies in equal parts")


def mixing(adata, *, k: int = 30, n_pcs: int = 30, max_cells: int = 3000, seed: int = 0) -> dict[str, Any]:
    """The batch mixing of obs[STUDY_KEY] in ``adata``: :func:`perturbkit.metrics.knn_batch_entropy` on a
    PCA of X (scikit-learn, seeded), over up to ``max_cells`` cells drawn with ``seed``."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    from .metrics.functions import knn_batch_entropy

    rng = np.random.default_rng(seed)
    n = adata.n_obs
    rows = np.sort(rng.choice(n, size=max_cells, replace=False)) if n > max_cells else np.arange(n)
    X = adata.X[rows]
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    n_comp = int(min(n_pcs, X.shape[0] - 1, X.shape[1]))
    emb = PCA(n_components=n_comp, random_state=seed).fit_transform(X.astype(np.float64)) if n_comp >= 1 else X
    batch = adata.obs[STUDY_KEY].astype(str).to_numpy()[rows]
    kk = int(min(k, len(rows) - 1))
    return {"score": knn_batch_entropy(emb, batch, k=kk), "k": kk, "n_pcs": n_comp, "n_cells": int(len(rows))}


def query_split(adata, spec: PerturbSpec, context: str, *, min_cells: int = 3):
    """The :class:`~perturbkit.split.Split` of one query context in a prepared AnnData (:func:`prepare`):
    train = every reference cell; source = the query's control cells of ``context``; target = its cells of
    each of the reference's perturbations with at least ``min_cells`` cells there (``info["scored"]``: any).
    ``info["perturbations"]`` = every perturbation of the reference (each is predicted). None when the context
    has fewer than ``min_cells`` control cells in the query."""
    from .split import Split

    obs = adata.obs
    study = obs[STUDY_KEY].astype(str).to_numpy()
    cond = obs[spec.condition_key].astype(str).to_numpy()
    train = np.flatnonzero(study == REFERENCE)
    perts = spec.perturbations(adata[train])
    here = (study == QUERY) & (obs[spec.context_key].astype(str).to_numpy() == context)
    source = np.flatnonzero(here & (cond == spec.control))
    if len(source) < min_cells:
        return None
    truth = [p for p in perts if int((here & (cond == p)).sum()) >= min_cells]
    target = np.flatnonzero(here & np.isin(cond, truth))
    return Split(train=train, source=source, target=target, name=f"query:{context}",
                 info={"scenario": "query", "context": context, "scored": bool(truth), "perturbations": perts,
                       "truth": truth})


def query_splits(t: Transfer, *, min_cells: int = 3) -> tuple[dict[str, Any], dict[str, str]]:
    """(context -> :func:`query_split`, context -> why it is not predicted) for every query context: a
    context with at least ``min_cells`` control cells is a task (scored where it has ``min_cells`` perturbed
    cells too)."""
    spec, obs = t.spec, t.adata.obs
    in_q = obs[STUDY_KEY].astype(str).to_numpy() == QUERY
    splits, skipped = {}, {}
    for c in sorted(set(obs[spec.context_key].astype(str).to_numpy()[in_q])):
        s = query_split(t.adata, spec, c, min_cells=min_cells)
        if s is None:
            skipped[c] = f"fewer than {min_cells} control cells in the query to predict from"
        else:
            splits[c] = s
    if not splits:
        raise InputError(f"query: no context of obs[{spec.context_key!r}] has >= {min_cells} control cells to "
                         "predict from (" + "; ".join(f"{c}: {w}" for c, w in skipped.items())
                         + "). Check query_context_key and query_control.", params=("query_context_key",))
    return splits, skipped


# ------------------------------------------------------------------------------------------ pseudo-study


@dataclass(frozen=True)
class Shift:
    """The technical shift of a pseudo-study's query (see :func:`pseudo_study`)."""

    depth: float = 0.5  # mean share of the counts kept (binomial thinning)
    capture_sd: float = 0.5  # sd of the log of the gene-wise capture efficiencies (log-normal, median 1)
    missing_genes: float = 0.1  # share of the genes the query does not measure
    shuffle_genes: bool = True  # the query's genes in another (seeded) order

    def check(self, where: str = "shift") -> None:
        for name, lo, hi in (("depth", 0.0, 1.0), ("missing_genes", 0.0, 0.9)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v <= hi if name == "depth"
                                                                              else lo <= v <= hi):
                raise InputError(f"{where}.{name} must be a number in {'(0, 1]' if name == 'depth' else '[0, 0.9]'}"
                                 f", got {v!r}.")
        if isinstance(self.capture_sd, bool) or not isinstance(self.capture_sd, (int, float)) or self.capture_sd < 0:
            raise InputError(f"{where}.capture_sd must be a number >= 0, got {self.capture_sd!r}.")


def split_donors(donors, n_query: int | None = None, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """(reference donors, query donors): the sorted donors shuffled with ``default_rng(seed)``; the first
    ``n_query`` (default: half, rounded down) are the query's."""
    donors = sorted({str(d) for d in donors})
    if len(donors) < 2:
        raise InputError(f"a pseudo-study needs >= 2 donors to split into reference and query, got "
                         f"{len(donors)}.")
    n_query = len(donors) // 2 if n_query is None else int(n_query)
    if not 1 <= n_query < len(donors):
        raise InputError(f"query_donors must be from 1 to {len(donors) - 1} (of {len(donors)} donors), got "
                         f"{n_query}.")
    order = np.random.default_rng(seed).permutation(len(donors))
    query = sorted(donors[i] for i in order[:n_query])
    return sorted(set(donors) - set(query)), query


def pseudo_study(counts, donor_key: str, query_donors, shift: Shift = Shift(), *, seed: int = 0):
    """(reference, query, info): the cells of ``query_donors`` become a second "study" with a technical shift;
    the others are the reference, unchanged.

    ``counts`` must hold raw counts. The query's counts are thinned: each count ``n`` of gene ``g`` becomes
    ``Binomial(n, p_g)`` with ``p_g = min(1, depth * e_g)``, ``e_g`` a gene-wise capture efficiency
    ``exp(Normal(0, capture_sd))`` (log-normal, median 1); a share ``missing_genes`` of the genes is removed
    and the remaining genes are put in another order. Every draw comes from ``default_rng(seed)``.
    """
    import scipy.sparse as sp

    from .data import looks_like_counts

    shift.check()
    if not looks_like_counts(counts.X):
        raise InputError("pseudo_study needs raw counts (non-negative integers) to thin; X does not look like "
                         "counts. Use the count matrix (e.g. adata.layers['counts']).")
    donor = counts.obs[donor_key].astype(str).to_numpy()
    query_donors = [str(d) for d in query_donors]
    in_q = np.isin(donor, query_donors)
    rng = np.random.default_rng(seed)
    n_genes = counts.n_vars
    efficiency = np.exp(rng.normal(0.0, shift.capture_sd, size=n_genes))
    p = np.minimum(1.0, shift.depth * efficiency)
    Xq = sp.csr_matrix(counts.X[in_q], dtype=np.float64)
    Xq.data = rng.binomial(np.rint(Xq.data).astype(np.int64), p[Xq.indices]).astype(np.float32)
    Xq.eliminate_zeros()
    n_missing = int(round(shift.missing_genes * n_genes))
    dropped = np.sort(rng.choice(n_genes, size=n_missing, replace=False)) if n_missing else np.array([], int)
    kept = np.setdiff1d(np.arange(n_genes), dropped)
    order = rng.permutation(kept) if shift.shuffle_genes else kept
    ref = counts[~in_q].copy()
    query = counts[in_q].copy()
    query.X = Xq
    query = query[:, order].copy()
    before = float(np.asarray(counts.X[in_q].sum()))
    info = {"query_donors": sorted(query_donors), "reference_donors": sorted(set(donor) - set(query_donors)),
            "shift": {"depth": shift.depth, "capture_sd": shift.capture_sd,
                      "missing_genes": shift.missing_genes, "shuffle_genes": shift.shuffle_genes},
            "seed": seed, "counts_kept": float(Xq.sum()) / before if before else 0.0,
            "genes_missing": int(n_missing), "capture_clipped_at_1": int((shift.depth * efficiency >= 1).sum())}
    return ref, query, info
