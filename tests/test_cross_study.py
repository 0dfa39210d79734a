"""Reference -> query transfer (predict --query), integration, the batch-mixing score and the cross_study
scenario, on small synthetic count data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbkit import transfer
from perturbkit.cli import main
from perturbkit.metrics import knn_batch_entropy
from perturbkit.spec import PerturbSpec, Preprocessing
from perturbkit.synthetic import synthetic

from conftest import need

FAST = ["--model", "mean_shift", "--n-top-genes", "50", "--n-boot", "5", "--metrics",
        "r2_mean_all,pearson_delta", "--no-progress", "--device", "cpu"]


def counts(seed: int = 0, n_cells: int = 30, n_genes: int = 80):
    """Synthetic raw counts: 3 contexts x 2 conditions x ``n_cells``, donors d0..d3, a planted response."""
    a = synthetic(n_contexts=3, n_cells=n_cells, n_genes=n_genes, seed=seed)
    rng = np.random.default_rng(seed)
    X = rng.poisson(np.expm1(a.X) * 3).astype(np.float32)
    X[:, -1] += 30  # totals large enough to read as counts
    a.X = sp.csr_matrix(X)
    a.obs["donor"] = pd.Categorical([f"d{i % 4}" for i in range(a.n_obs)])
    return a


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(reference file, query file with its own keys and labels, the query AnnData) of a pseudo-study."""
    d = tmp_path_factory.mktemp("cross_study")
    ref, query, _info = transfer.pseudo_study(counts(), "donor", ["d1", "d3"], seed=0)
    ref.write_h5ad(d / "ref.h5ad")
    q = query.copy()
    q.obs = q.obs.rename(columns={"condition": "stim", "cell_type": "celltype"})
    q.obs["stim"] = q.obs["stim"].astype(str).map({"control": "CTRL", "stimulated": "STIM"})
    q.write_h5ad(d / "query.h5ad")
    return d / "ref.h5ad", d / "query.h5ad", q


QUERY_KEYS = ["--query-condition-key", "stim", "--query-control", "CTRL", "--query-perturbed", "STIM",
              "--query-context-key", "celltype"]


def test_predict_query_on_a_pseudo_study(study, tmp_path):
    ref_path, q_path, q = study
    out = tmp_path / "out"
    assert main(["predict", "--data", str(ref_path), "--query", str(q_path), *QUERY_KEYS, "--out", str(out),
                 *FAST]) == 0
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores.context) == {"ctx0", "ctx1", "ctx2"}  # every metric per query context
    assert {"mean_shift", "control", "ceiling"} <= set(scores.model)
    rec = json.loads((out / "record.json").read_text())
    genes = rec["transfer"]["genes"]
    pred = ad.read_h5ad(out / "pred.h5ad")
    ref_genes = set(ad.read_h5ad(ref_path).var_names)
    # the pseudo-study dropped 10 % of the genes: the HVGs the query lacks are recorded, the rest predicted
    assert genes["dropped"] and set(genes["dropped"]).isdisjoint(q.var_names)
    assert genes["shared"] == pred.n_vars and set(pred.var_names) <= set(q.var_names) & ref_genes
    assert genes["shared"] + len(genes["dropped"]) == 50
    assert pred.n_obs == int((q.obs.stim == "CTRL").sum())  # the query's control cells, each predicted once
    assert set(pred.obs_names) == set(q.obs_names[q.obs.stim == "CTRL"])
    assert rec["transfer"]["integration"]["method"] == "none"
    assert 0 <= rec["transfer"]["integration"]["mixing_before"]["score"] <= 1


def test_query_gene_order_and_extra_genes_do_not_change_the_prediction(study, tmp_path):
    ref_path, q_path, q = study
    spec = PerturbSpec()
    keys = transfer.QueryKeys(condition_key="stim", control="CTRL", perturbed="STIM", context_key="celltype")
    ref = ad.read_h5ad(ref_path)
    pp = Preprocessing(n_top_genes=50)
    t1 = transfer.prepare(ref, q, spec, pp, keys=keys, log=lambda m: None)
    # other gene names (two genes the reference does not have) in another order
    rng = np.random.default_rng(1)
    extra = ad.AnnData(X=sp.csr_matrix(rng.poisson(2, size=(q.n_obs, 2)).astype(np.float32)), obs=q.obs,
                       var=pd.DataFrame(index=["NOT_IN_REF1", "NOT_IN_REF2"]))
    q2 = ad.concat([q, extra], axis=1, merge="first")
    q2 = q2[:, rng.permutation(q2.n_vars)].copy()
    t2 = transfer.prepare(ref, q2, spec, pp, keys=keys, log=lambda m: None)
    assert list(t1.adata.var_names) == list(t2.adata.var_names)  # the reference's order
    assert t1.info["genes"]["dropped"] == t2.info["genes"]["dropped"]
    # per-cell normalisation runs over all of the query's own genes: the extra genes change its totals only
    a = t1.adata.X.toarray()[t1.n_reference:]
    b = t2.adata.X.toarray()[t2.n_reference:]
    assert not np.allclose(a, b) and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    q3 = q[:, rng.permutation(q.n_vars)].copy()  # the same genes, another order: identical
    t3 = transfer.prepare(ref, q3, spec, pp, keys=keys, log=lambda m: None)
    np.testing.assert_array_equal(t1.adata.X.toarray(), t3.adata.X.toarray())


def test_query_sharing_too_few_genes_stops_with_one_line(study, tmp_path, capsys):
    ref_path, _q_path, q = study
    few = q[:, : int(q.n_vars * 0.3)].copy()
    few.var_names = [f"ENSG{i:011d}" if i % 2 else g for i, g in enumerate(few.var_names)]
    path = tmp_path / "few.h5ad"
    few.write_h5ad(path)
    out = tmp_path / "o"
    assert main(["predict", "--data", str(ref_path), "--query", str(path), *QUERY_KEYS, "--out", str(out),
                 *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: query: shares ") and "--min-shared-genes" in err and "\n" not in err
    assert not out.exists()
    # a lower threshold accepts it
    assert main(["predict", "--data", str(ref_path), "--query", str(path), *QUERY_KEYS, "--out", str(out),
                 "--min-shared-genes", "0.05", *FAST]) == 0


def test_query_without_the_control_label_stops_with_one_line(study, tmp_path, capsys):
    ref_path, q_path, _q = study
    keys = [k if k != "CTRL" else "ctrl" for k in QUERY_KEYS]
    assert main(["predict", "--data", str(ref_path), "--query", str(q_path), *keys, "--out",
                 str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "control 'ctrl' is not a value of the query's obs['stim']" in err and "--query-control" in err
    assert "Did you mean" in err and "\n" not in err
    # the query's condition column itself missing: names --query-condition-key
    assert main(["predict", "--data", str(ref_path), "--query", str(q_path), "--out", str(tmp_path / "o"),
                 *FAST]) == 2
    assert "--query-condition-key" in capsys.readouterr().err


def test_query_and_holdout_together_are_refused(study, tmp_path, capsys):
    ref_path, q_path, _q = study
    assert main(["predict", "--data", str(ref_path), "--query", str(q_path), "--holdout", "ctx0", "--out",
                 str(tmp_path / "o"), *FAST]) == 2
    assert "--holdout" in capsys.readouterr().err
    assert main(["predict", "--data", str(ref_path), "--holdout", "ctx0", "--integrate", "combat", "--out",
                 str(tmp_path / "o"), *FAST]) == 2
    assert "--query" in capsys.readouterr().err
    assert main(["predict", "--data", str(ref_path), "--query", str(q_path), *QUERY_KEYS, "--integrate", "harmony",
                 "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --integrate 'harmony' is not an integration method.") and "'combat'" in err


def _prepared(study, integrate):
    ref_path, _q_path, q = study
    keys = transfer.QueryKeys(condition_key="stim", control="CTRL", perturbed="STIM", context_key="celltype")
    return transfer.prepare(ad.read_h5ad(ref_path), q, PerturbSpec(), Preprocessing(n_top_genes=50), keys=keys,
                            integrate=integrate, log=lambda m: None)


def test_combat_is_scanpys_estimated_on_the_controls_and_applied_to_every_cell(study):
    import scanpy as sc

    t0, t1 = _prepared(study, "none"), _prepared(study, "combat")
    X0 = t0.adata.X.toarray().astype(np.float64)
    X1 = np.asarray(t1.adata.X, dtype=np.float64)
    obs = t0.adata.obs
    ctrl = (obs.condition == "control").to_numpy()
    tmp = ad.AnnData(X=X0[ctrl], obs=obs.loc[ctrl, [transfer.STUDY_KEY]].astype(str))
    varies = tmp.X.std(axis=0) > 0
    sub = tmp[:, varies].copy()
    sc.pp.combat(sub, key=transfer.STUDY_KEY)
    expect = np.clip(sub.X, 0, None)
    np.testing.assert_allclose(X1[ctrl][:, varies], expect, atol=1e-5)  # the controls: scanpy's ComBat
    # the perturbed cells of a study get the same per-gene affine map as its controls (a x + c)
    study_ = obs[transfer.STUDY_KEY].to_numpy()
    q = study_ == transfer.QUERY
    g = int(np.argmax(varies & (X0[ctrl & q].std(axis=0) > 0)))
    x, y = X0[ctrl & q, g], X1[ctrl & q, g]
    keep = y > 0
    a, c = np.polyfit(x[keep], y[keep], 1)
    pert = (~ctrl) & q
    np.testing.assert_allclose(X1[pert, g], np.clip(a * X0[pert, g] + c, 0, None), atol=1e-4)
    info = t1.info["integration"]
    assert info["mixing_after"]["score"] > info["mixing_before"]["score"]


def test_combat_does_not_see_the_querys_perturbed_cells(study):
    ref_path, _q_path, q = study
    keys = transfer.QueryKeys(condition_key="stim", control="CTRL", perturbed="STIM", context_key="celltype")
    q2 = q.copy()
    pert = (q2.obs.stim == "STIM").to_numpy()
    X = q2.X.toarray()
    X[pert] = np.random.default_rng(3).poisson(5, size=X[pert].shape)  # other truth cells
    q2.X = sp.csr_matrix(X)
    pp = Preprocessing(n_top_genes=50)
    t1 = transfer.prepare(ad.read_h5ad(ref_path), q, PerturbSpec(), pp, keys=keys, integrate="combat",
                          log=lambda m: None)
    t2 = transfer.prepare(ad.read_h5ad(ref_path), q2, PerturbSpec(), pp, keys=keys, integrate="combat",
                          log=lambda m: None)
    ctrl = (t1.adata.obs.condition == "control").to_numpy()
    np.testing.assert_array_equal(np.asarray(t1.adata.X)[ctrl], np.asarray(t2.adata.X)[ctrl])


def test_knn_batch_entropy_by_hand():
    # two groups far apart; k = 2. Left: A B A -> the As see one A and one B (entropy log 2 -> 1), B sees two
    # As (0). Right: three As (0). Mean: 2/6.
    X = np.array([0.0, 0.1, 0.2, 100.0, 100.1, 100.2])[:, None]
    assert knn_batch_entropy(X, list("ABAAAA"), k=2) == pytest.approx(1 / 3)
    assert knn_batch_entropy(X, list("AAAAAA"), k=2) == 0.0  # one batch: no mixing to measure
    # equilateral triangles far apart, A A B in each, k = 2: each A sees an A and the B (1), the B two As (0)
    tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    Y = np.vstack([tri, tri + 50.0])
    assert knn_batch_entropy(Y, list("AABAAB"), k=2) == pytest.approx(2 / 3)
    assert knn_batch_entropy(Y, list("AAABBB"), k=2) == 0.0  # the batches apart: no mixing
    assert knn_batch_entropy(Y, list("AAABBB"), k=1) == 0.0  # one neighbour never shows mixing
    with pytest.raises(ValueError):
        knn_batch_entropy(X, list("ABAAAA"), k=6)


def test_pseudo_study_shift_is_seeded_and_documented():
    a = counts()
    ref, q, info = transfer.pseudo_study(a, "donor", ["d1"], transfer.Shift(depth=0.5, capture_sd=0.0,
                                                                           missing_genes=0.25), seed=3)
    ref2, q2, _ = transfer.pseudo_study(a, "donor", ["d1"], transfer.Shift(depth=0.5, capture_sd=0.0,
                                                                          missing_genes=0.25), seed=3)
    assert list(q.var_names) == list(q2.var_names) and (q.X != q2.X).nnz == 0  # seeded
    assert set(ref.obs.donor) == {"d0", "d2", "d3"} and set(q.obs.donor) == {"d1"}
    assert (ref.X != a[a.obs.donor != "d1"].X).nnz == 0  # the reference is untouched
    assert q.n_vars == 60 and list(q.var_names) != sorted(q.var_names, key=lambda g: int(g[4:]))
    orig = a[a.obs.donor == "d1"][:, q.var_names].X
    assert (q.X > orig).nnz == 0  # thinning never adds counts
    kept = q.X.sum() / orig.sum()
    assert 0.45 < kept < 0.55 and info["shift"]["depth"] == 0.5  # Binomial(n, 0.5) keeps half
    with pytest.raises(Exception, match="raw counts"):
        transfer.pseudo_study(synthetic(), "donor", ["d1"])


def test_cross_study_scenario_on_a_tiny_config(tmp_path):
    from perturbkit.bench import run

    counts(n_cells=25, n_genes=60).write_h5ad(tmp_path / "counts.h5ad")
    (tmp_path / "tiny.toml").write_text(f"""
name = "tiny_cross_study"
seeds = [0, 1]
[data]
source = "{tmp_path / 'counts.h5ad'}"
donor_key = "donor"
[preprocessing]
n_top_genes = 40
[evaluation]
metrics = ["r2_mean_all", "pearson_delta"]
n_boot = 5
baselines = false
[output]
figures = false
umap = false
[scenarios.cross_study]
contexts = ["ctx0", "ctx2"]
query_donors = 2
min_cells = 5
[models.control]
[models.mean_shift]
""")
    out = tmp_path / "run"
    summary = run(tmp_path / "tiny.toml", out, progress=False, log=lambda m: None)
    assert len(summary["ran"]) == 2 * 2 * 2 * 2 and not summary["failed"]  # integrations x contexts x models x seeds
    table = pd.read_csv(out / "cross_study.csv")
    assert set(table.integration) == {"none", "combat"}
    assert table[table.integration == "none"].change_vs_none.isna().all()
    assert table[table.integration == "combat"].change_vs_none.notna().all()
    mixing = table.groupby("integration").mixing.first()
    assert 0 <= mixing["none"] < mixing["combat"] <= 1
    cell = json.loads(next((out / "cells").glob("*combat*control*s0*/result.json")).read_text())
    info = cell["split_info"]
    assert info["integration"]["method"] == "combat" and info["query_donors"] and info["pseudo_study"]["shift"]
    scores = pd.read_csv(out / "scores.csv")
    # mean_shift learns the reference's shift: better than no change in the query, with and without ComBat
    pd_ = scores[(scores.metric == "pearson_delta") & scores.model.isin(["mean_shift", "control"])]
    means = pd_.groupby(["variant", "model"]).value.mean()
    assert (means.xs("mean_shift", level="model") > means.xs("control", level="model")).all()


def test_a_screen_query_is_matched_by_perturbation_name(tmp_path):
    from perturbkit.pipeline import PredictConfig, run_predict
    from perturbkit.synthetic import synthetic_screen

    ref = synthetic_screen(n_cells=20, seed=0)
    query = synthetic_screen(n_cells=20, seed=1)
    query = query[query.obs.condition.astype(str) != "C"].copy()  # the query did not measure C
    query.obs_names = [f"q{i}" for i in range(query.n_obs)]
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    spec = PerturbSpec(perturbed="all")
    cfg = PredictConfig(data=str(tmp_path / "ref.h5ad"), query=str(tmp_path / "query.h5ad"), holdout=None,
                        model="mean_shift", spec=spec, preprocessing=Preprocessing(n_top_genes=0), n_boot=0,
                        metrics=("r2_mean_all", "pearson_delta"))
    rec = run_predict(cfg, tmp_path / "out", log=lambda m: None)
    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    per = scores[~scores.perturbation.isin(["mean", "mean_responsive", "all"])]
    assert set(per.perturbation) == {"A", "B", "D", "A+B", "C+D"}  # C has no truth in the query: not scored
    assert set(per.context) == set(query.obs.cell_type)
    pred = ad.read_h5ad(tmp_path / "out" / "pred.h5ad")
    assert "C" in set(pred.obs.condition)  # ... but predicted, as every perturbation the reference learned
    assert rec["transfer"]["genes"]["dropped"] == []
    with pytest.raises(Exception, match="query_perturbed 'X' maps one label"):
        run_predict(PredictConfig(**{**cfg.__dict__, "query_keys": {"perturbed": "X"}}), tmp_path / "o2",
                    log=lambda m: None)


def test_scvi_integration_decodes_every_cell_in_the_reference_batch(study):
    """scvi-tools is in the test extra: CI runs this (skipped elsewhere without it; docs/cross_study.md)."""
    need("scvi", "scvi-tools")
    ref_path, _q_path, q = study
    keys = transfer.QueryKeys(condition_key="stim", control="CTRL", perturbed="STIM", context_key="celltype")
    t = transfer.prepare(ad.read_h5ad(ref_path), q, PerturbSpec(), Preprocessing(n_top_genes=50), keys=keys,
                         integrate="scvi", scvi_epochs=5, log=lambda m: None)
    X = np.asarray(t.adata.X)
    assert np.isfinite(X).all() and X.min() >= 0
    # decoded at library size 1e4, log1p: every cell's expm1 sums to about 1e4 over the genes scVI saw
    np.testing.assert_allclose(np.expm1(X.astype(np.float64)).sum(axis=1), 1e4, rtol=1e-3)
    info = t.info["integration"]
    assert info["method"] == "scvi" and info["epochs"] == 5 and 0 <= info["mixing_after"]["score"] <= 1
    # the study is shifted (thinned, capture, missing genes): scVI mixes it better than none (0.895 -> 0.984)
    assert info["mixing_after"]["score"] > info["mixing_before"]["score"] + 0.03
    t2 = transfer.prepare(ad.read_h5ad(ref_path), q, PerturbSpec(), Preprocessing(n_top_genes=50), keys=keys,
                          integrate="scvi", scvi_epochs=5, log=lambda m: None)
    np.testing.assert_allclose(np.asarray(t2.adata.X), X, atol=1e-5)  # seeded


def test_scvi_without_scvi_tools_or_counts_says_what_to_do(study, monkeypatch):
    import sys

    ref_path, _q_path, q = study
    keys = transfer.QueryKeys(condition_key="stim", control="CTRL", perturbed="STIM", context_key="celltype")
    monkeypatch.setitem(sys.modules, "scvi", None)  # as if not installed
    with pytest.raises(Exception, match="needs scvi-tools, which is not installed: pip install scvi-tools"):
        transfer.prepare(ad.read_h5ad(ref_path), q, PerturbSpec(), Preprocessing(n_top_genes=50), keys=keys,
                         integrate="scvi", log=lambda m: None)
    logq = q.copy()
    logq.X = logq.X.toarray().astype(np.float32) * 0.5 + 0.25  # not counts
    with pytest.raises(Exception, match="integrate 'scvi' models raw counts"):
        transfer.prepare(ad.read_h5ad(ref_path), logq, PerturbSpec(), Preprocessing(n_top_genes=50), keys=keys,
                         integrate="scvi", log=lambda m: None)
