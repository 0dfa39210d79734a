"""Data that stays on disk (perturbkit.ondisk): chunked reads and checks with the in-memory verdicts, out-of-core
preprocessing that selects the in-memory genes and values, and files that are truncated or change while read."""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import perturbkit as pk
from perturbkit import ondisk
from perturbkit.errors import InputError
from perturbkit.spec import Preprocessing


def counts(n_cells: int = 300, n_genes: int = 120, seed: int = 0, density: float = 0.3) -> ad.AnnData:
    """Seeded raw counts (CSR int) with gene-specific means and dispersions, a perturbed condition that raises
    the first 10 genes, and two contexts."""
    rng = np.random.default_rng(seed)
    mean = rng.gamma(0.6, 3.0, size=n_genes)
    cond = np.repeat(["control", "stimulated"], n_cells // 2)
    lam = mean[None, :] * rng.gamma(2.0, 0.5, size=(n_cells, n_genes))
    lam[cond == "stimulated", :10] *= 4
    X = rng.poisson(lam) * (rng.random((n_cells, n_genes)) < density + 0.5 * (lam > 3))
    obs = pd.DataFrame({"condition": pd.Categorical(cond),
                        "cell_type": pd.Categorical(np.tile(["a", "b"], n_cells // 2))},
                       index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(sp.csr_matrix(X.astype(np.float32)), obs=obs,
                      var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


def write(adata, path, dense: bool = False):
    adata = adata.copy()
    if dense and sp.issparse(adata.X):
        adata.X = adata.X.toarray()
    adata.write_h5ad(path)
    return path


def same(ref: ad.AnnData, od: ondisk.OnDisk) -> None:
    """The on-disk result has the in-memory genes, byte-identical values and scanpy's var columns (1e-6)."""
    assert list(od.var_names) == list(ref.var_names)
    got = od.to_memory()
    want = sp.csr_matrix(ref.X)
    assert got.X.dtype == want.dtype == np.float32
    assert (got.X != want).nnz == 0
    for col in ("means", "dispersions", "dispersions_norm"):
        if col in ref.var:
            np.testing.assert_allclose(got.var[col].to_numpy(float), ref.var[col].to_numpy(float),
                                       rtol=0, atol=1e-6, equal_nan=True)
    assert list(got.obs_names) == list(ref.obs_names)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger"])
def test_preprocess_to_disk_is_the_in_memory_result(tmp_path, dense, flavor):
    adata = counts()
    pp = Preprocessing(n_top_genes=40, hvg_flavor=flavor)
    ref, info = pk.data.preprocess(adata, pp, log=lambda m: None)
    src = write(adata, tmp_path / "in.h5ad", dense)
    with ondisk.OnDisk(src, chunk_size=37) as od_in:  # 300 rows: 9 chunks, the last one short
        od, info2 = ondisk.preprocess_to_disk(od_in, pp, tmp_path / "pp.h5ad", log=lambda m: None)
    with od:
        same(ref, od)
        assert od.X.format == "csr"
        assert list(od.uns[pk._keys.UNS_PREPROCESS]["steps"]) == info["steps"]
    assert info2 == info


def test_kang_selects_the_in_memory_genes(tmp_path):
    """The bundled Kang data: the 2,000 genes and the values of pk.data.preprocess, in 5 chunks."""
    ref, info = pk.data.preprocess(pk.data.load("kang2018"), log=lambda m: None)
    with ondisk.OnDisk(pk.data.dataset_path("kang2018"), chunk_size=3000) as src:
        od, info2 = ondisk.preprocess_to_disk(src, Preprocessing(), tmp_path / "kang.h5ad", log=lambda m: None)
    with od:
        assert od.n_vars == 2000
        same(ref, od)
    assert info2 == info


def test_log_data_and_all_genes(tmp_path):
    """Log-normalised input is used as is; n_top_genes=0 and n_top_genes > genes keep every gene."""
    adata = pk.data.synthetic(n_cells=40, n_genes=30)
    src = write(adata, tmp_path / "log.h5ad")
    for n_top in (0, 50):
        pp = Preprocessing(n_top_genes=n_top)
        ref, info = pk.data.preprocess(adata, pp, log=lambda m: None)
        od, info2 = ondisk.preprocess_to_disk(src, pp, tmp_path / f"pp{n_top}.h5ad", log=lambda m: None)
        with od:
            same(ref, od)
        assert info2 == info


def test_reads_rows_in_any_order(tmp_path):
    adata = counts(n_cells=100, n_genes=20)
    for dense in (False, True):
        with ondisk.OnDisk(write(adata, tmp_path / f"x{dense}.h5ad", dense), chunk_size=16) as od:
            full = sp.csr_matrix(adata.X).toarray()
            dense_of = (lambda b: b.toarray() if sp.issparse(b) else b)
            idx = np.array([7, 3, 3, 99, 0])
            np.testing.assert_array_equal(dense_of(od.X.take(idx)), full[idx])
            np.testing.assert_array_equal(dense_of(od.X[10:20]), full[10:20])
            order = np.random.default_rng(0).permutation(100)
            got = [(i, dense_of(b)) for i, b in od.X.chunks(rows=order)]
            assert [len(i) for i, _b in got] == [16] * 6 + [4]
            for i, b in got:
                np.testing.assert_array_equal(b, full[i])
            assert [(s, e) for s, e, _b in od.X.chunks()] == [(s, min(s + 16, 100)) for s in range(0, 100, 16)]


def bad_matrices():
    base = counts(n_cells=60, n_genes=12).X.toarray()
    nan, neg, big = base.copy(), base.copy(), base.astype(np.float64)
    nan[5, 3] = nan[50, 1] = np.nan
    nan[40, 2] = np.inf
    neg[45, 4] = -2.5
    big[55, 0] = 1e300
    return {"nan": nan, "negative": neg, "too large": big, "zeros": np.zeros_like(base)}


@pytest.mark.parametrize("case", ["nan", "negative", "too large", "zeros", "dup genes", "dup cells"])
@pytest.mark.parametrize("dense", [False, True])
def test_chunked_checks_give_the_in_memory_verdicts(tmp_path, case, dense):
    adata = counts(n_cells=60, n_genes=12)
    if case in bad_matrices():
        adata.X = bad_matrices()[case]
        if not dense:  # keep the bad values as stored entries
            adata.X = sp.csr_matrix(np.where(adata.X == 0, 0, adata.X))
    elif case == "dup genes":
        adata.var_names = ["g0"] * 2 + list(adata.var_names[2:])
    else:
        adata.obs_names = list(adata.obs_names[:-1]) + ["c0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write(adata, tmp_path / "bad.h5ad", dense)
    with pytest.raises(InputError) as want:
        pk.data.preprocess(adata, log=lambda m: None)
    with pytest.raises(InputError) as got:
        with ondisk.OnDisk(src, chunk_size=7) as od:
            ondisk.preprocess_to_disk(od, Preprocessing(), tmp_path / "pp.h5ad", log=lambda m: None)
    assert str(got.value) == str(want.value)
    assert not list(tmp_path.glob("*pp.h5ad*"))  # nothing written, not even a temporary file
    if case != "zeros":  # check_matrix alone, in chunks, on a freshly opened file
        with ondisk.OnDisk(src, chunk_size=7) as od, pytest.raises(InputError) as alone:
            pk.data.check_matrix(od)
        assert str(alone.value) == str(want.value)


def test_validate_takes_an_on_disk_file(syn_path, syn):
    spec = pk.PerturbSpec()
    with ondisk.OnDisk(syn_path, chunk_size=50) as od:
        pk.data.validate(od, spec, holdout="ctx1")
        with pytest.raises(InputError, match="holdout 'ctx9' is not a value"):
            pk.data.validate(od, spec, holdout="ctx9")
    assert ondisk.value_stats(syn.X) == ondisk.value_stats(ondisk.OnDisk(syn_path, chunk_size=50).X)


def test_csc_and_unknown_flavour_are_refused(tmp_path):
    adata = counts(n_cells=40, n_genes=20)
    adata.X = sp.csc_matrix(adata.X)
    src = write(adata, tmp_path / "csc.h5ad")
    with pytest.raises(InputError, match=r"stored as CSC .* adata.X = adata.X.tocsr\(\)"):
        ondisk.OnDisk(src)
    with pytest.raises(InputError, match="hvg_flavor 'seurat_v3' cannot be computed in chunks"):
        ondisk.preprocess_to_disk(write(counts(40, 20), tmp_path / "csr.h5ad"),
                                  Preprocessing(n_top_genes=5, hvg_flavor="seurat_v3"), tmp_path / "pp.h5ad")


def test_truncated_file_stops_with_one_line(tmp_path):
    src = write(counts(n_cells=400, n_genes=60), tmp_path / "in.h5ad")
    size = src.stat().st_size
    cache = tmp_path / "cache"
    for keep in (size // 2, size - 100):
        with open(src, "r+b") as fh:
            fh.truncate(keep)
        with pytest.raises(InputError, match="truncated or corrupt") as err:
            ondisk.preprocessed(src, Preprocessing(n_top_genes=20), cache, log=lambda m: None)
        assert "\n" not in str(err.value)
        assert not cache.exists() or not list(cache.iterdir())


# read 1: the rows that tell counts; 2-9: the first pass; 10-17: the second (writing) pass
@pytest.mark.parametrize("when", [3, 12])
def test_file_changing_while_read_leaves_no_cache(tmp_path, monkeypatch, when):
    src = write(counts(n_cells=400, n_genes=60), tmp_path / "in.h5ad")
    cache = tmp_path / "cache"
    reads = {"n": 0}
    rows = ondisk.DiskMatrix.rows

    def rows_then_touch(self, start, stop):
        out = rows(self, start, stop)
        reads["n"] += 1
        if reads["n"] == when:  # another process rewrites the file in place
            st = os.stat(src)
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return out

    monkeypatch.setattr(ondisk.DiskMatrix, "rows", rows_then_touch)
    monkeypatch.setattr(ondisk, "chunk_rows", lambda n_vars, budget=0: 50)  # 8 chunks per pass
    with pytest.raises(InputError, match="changed .*while it was read .* nothing was written") as err:
        ondisk.preprocessed(src, Preprocessing(n_top_genes=20), cache, log=lambda m: None)
    assert "\n" not in str(err.value)
    assert reads["n"] == when  # the next read stopped before reading
    assert not cache.exists() or not list(cache.iterdir())  # no cache, no temporary file


def test_preprocessed_caches_one_file_per_input_and_settings(tmp_path):
    src = write(counts(n_cells=80, n_genes=30), tmp_path / "in.h5ad")
    cache = tmp_path / "cache"
    lines: list[str] = []
    od, info = ondisk.preprocessed(src, Preprocessing(n_top_genes=10), cache, log=lines.append)
    od.close()
    od2, info2 = ondisk.preprocessed(src, Preprocessing(n_top_genes=10), cache, log=lines.append)
    od3, _ = ondisk.preprocessed(src, Preprocessing(n_top_genes=12), cache, log=lines.append)
    assert od2.path == od.path != od3.path
    assert od.path.name == f"data-{ondisk.cache_key(pk.data.sha256(src), Preprocessing(n_top_genes=10))}.h5ad"
    assert "read from the cache" in lines[1] and "out of core" in lines[0]
    assert info2["steps"] == info["steps"] and od2.n_vars == 10 and od3.n_vars == 12
    assert sorted(p.name for p in cache.iterdir()) == sorted([od.path.name, od3.path.name])
    od2.close()
    od3.close()


def test_preprocessed_validates_the_spec_and_holdout(tmp_path):
    src = write(counts(n_cells=80, n_genes=30), tmp_path / "in.h5ad")
    cache, spec, pp = tmp_path / "cache", pk.PerturbSpec(), Preprocessing(n_top_genes=10)
    with pytest.raises(InputError, match="holdout 'z' is not a value"):
        ondisk.preprocessed(src, pp, cache, spec=spec, holdout="z", log=lambda m: None)
    assert not cache.exists() or not list(cache.iterdir())
    od, info = ondisk.preprocessed(src, pp, cache, spec=spec, holdout="a", log=lambda m: None)
    od.close()
    assert info["sha256"] == pk.data.sha256(src) and od.path.name == f"data-{ondisk.cache_key(info['sha256'], pp, spec)}.h5ad"
    with pytest.raises(InputError, match="holdout 'z' is not a value"):  # the cached file is checked too
        ondisk.preprocessed(src, pp, cache, spec=spec, holdout="z", log=lambda m: None)


def test_predict_backed_gives_the_in_memory_scores(tmp_path, capsys):
    """perturbkit predict --backed: the same scores as the in-memory run; the cache in OUT/.cache; one line and
    exit status 2 where it does not apply."""
    from perturbkit.cli import main

    src = write(counts(n_cells=240, n_genes=80), tmp_path / "in.h5ad")
    args = ["predict", "--data", str(src), "--model", "mean_shift", "--holdout", "a", "--n-top-genes", "30",
            "--n-boot", "5", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "mem")]) == 0
    assert main([*args, "--out", str(tmp_path / "disk"), "--backed"]) == 0
    mem, disk = ((tmp_path / d / "scores.csv").read_bytes() for d in ("mem", "disk"))
    assert disk == mem
    record = pk._io.read_json(tmp_path / "disk" / "record.json")
    assert record["config"]["backed"] is True and "backed" not in pk._io.read_json(tmp_path / "mem" /
                                                                                  "record.json")["config"]
    assert record["preprocessing"]["out_of_core"] is True
    assert (tmp_path / "disk" / record["preprocessing"]["cache"]).is_file()
    assert record["data"]["sha256"] == pk.data.sha256(src)
    capsys.readouterr()
    assert main(["predict", "--data", "kang2018", "--holdout", "CD4 T cells", "--backed", "--out",
                 str(tmp_path / "k")]) == 2
    assert main([*args, "--out", str(tmp_path / "f"), "--backed", "--filter", "cell_type=a,b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--backed" in err[0] and "registered dataset 'kang2018'" in err[0], err
    assert "--backed does not take --filter yet" in err[1], err


def test_edge_cases_as_in_memory(tmp_path):
    """Integer counts, a warned-about setting, and data where no gene varies: the in-memory outcome."""
    rng = np.random.default_rng(0)
    cases = {
        "int": (ad.AnnData(rng.poisson(2, (60, 30)).astype(np.int32) * 15), Preprocessing(n_top_genes=10)),
        "log data, normalize on": (ad.AnnData(rng.random((80, 30)).astype(np.float32) * 3),
                                   Preprocessing(n_top_genes=10, normalize=True)),
        "no gene varies": (ad.AnnData(np.full((20, 30), 25, dtype=np.float32)), Preprocessing(n_top_genes=10)),
    }
    for name, (adata, pp) in cases.items():
        src = write(adata, tmp_path / "in.h5ad")
        outcome = []
        for run in (lambda: pk.data.preprocess(adata, pp, log=lambda m: None),
                    lambda: ondisk.preprocess_to_disk(src, pp, tmp_path / "pp.h5ad", log=lambda m: None)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    res, info = run()
                    got = (list(res.var_names), sp.csr_matrix(res.X) if not isinstance(res, ondisk.OnDisk)
                           else res.to_memory().X)
                except InputError as exc:  # scanpy's own exception text differs; the rest is the same
                    got = str(exc).split(");", 1)[1]
            notes = [str(w.message) for w in caught if issubclass(w.category, pk.errors.InputWarning)]
            outcome.append((got, notes))
        (want, want_notes), (got, got_notes) = outcome
        assert got_notes == want_notes, name
        if isinstance(want, str):
            assert got == want and "only 0 of 30 genes vary" in got, name
        else:
            assert got[0] == want[0] and (got[1] != want[1]).nnz == 0, name
        assert name != "log data, normalize on" or len(want_notes) == 1


@pytest.mark.parametrize("model", ["scgen", "scpram"])
def test_predict_backed_trains_from_disk_with_the_in_memory_scores(tmp_path, model):
    """Kang CD4 T (a seeded 2,400-cell sample of the bundled data): with --backed the models train from batches
    read on disk (the training cells never in memory) and every score equals the in-memory run's to 1e-6 (the
    batches, means and predictions are the same numbers: in fact byte-identical)."""
    from perturbkit.cli import main

    kang = pk.data.load("kang2018")
    keep = np.sort(np.random.default_rng(0).choice(kang.n_obs, 2400, replace=False))
    src = write(kang[keep], tmp_path / "kang.h5ad")
    args = ["predict", "--data", str(src), "--model", model, "--holdout", "CD4 T cells", "--epochs", "2",
            "--param", "n_hidden=64", "--param", "n_latent=10", "--n-top-genes", "300", "--n-boot", "5",
            "--metrics", "r2_mean_all,r2_mean_top100,pearson_delta,edistance", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "mem")]) == 0
    assert main([*args, "--out", str(tmp_path / "disk"), "--backed"]) == 0
    mem, disk = (pd.read_csv(tmp_path / d / "scores.csv") for d in ("mem", "disk"))
    assert mem[["model", "metric"]].equals(disk[["model", "metric"]]) and len(mem) > 20
    np.testing.assert_allclose(disk.value.to_numpy(float), mem.value.to_numpy(float), rtol=0, atol=1e-6)
    record = pk._io.read_json(tmp_path / "disk" / "record.json")
    assert record["models"][model]["fit"]["history"]["n_train"] > 0
    pred_mem, pred_disk = (ad.read_h5ad(tmp_path / d / "pred.h5ad") for d in ("mem", "disk"))
    np.testing.assert_array_equal(pred_disk.X, pred_mem.X)
    assert pred_disk.obs.equals(pred_mem.obs)


def test_large_context_predicted_in_pieces_and_scored_on_a_sample(tmp_path, monkeypatch):
    """A held-out context larger than --eval-cells: every source cell is predicted piece by piece (pieces of 128
    cells here) and written to pred.h5ad, the moment metrics come from the streamed sums of every cell (equal to
    the run that scores every cell), the rest from the seeded sample (recorded)."""
    from perturbkit import engine
    from perturbkit.cli import main

    kang = pk.data.load("kang2018")
    keep = np.sort(np.random.default_rng(0).choice(kang.n_obs, 2400, replace=False))
    src = write(kang[keep], tmp_path / "kang.h5ad")
    args = ["predict", "--data", str(src), "--model", "scpram", "--holdout", "CD4 T cells", "--epochs", "2",
            "--param", "n_hidden=64", "--param", "n_latent=10", "--n-top-genes", "300", "--n-boot", "5",
            "--metrics", "r2_mean_all,r2_var_all,pearson_delta,edistance", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "all")]) == 0
    monkeypatch.setattr(engine, "PRED_CHUNK", 128)
    assert main([*args, "--out", str(tmp_path / "sample"), "--backed", "--eval-cells", "100"]) == 0
    every, sample = (pd.read_csv(tmp_path / d / "scores.csv") for d in ("all", "sample"))
    record = pk._io.read_json(tmp_path / "sample" / "record.json")
    scored = record["evaluation"]["cells_scored"]
    n_source = scored["source"][1]
    assert scored["sampled"] and scored["source"] == [100, n_source] and n_source > 256, scored
    assert scored["target"]["stimulated"][0] == 100 and scored["moments"].startswith("every cell")
    models = [m for m in every.model.unique() if m != "ceiling"]
    assert {"scpram", "control", "mean_shift", "linear"} <= set(models)
    for metric in ("r2_mean_all", "r2_var_all", "pearson_delta"):  # every cell's moments: the same scores
        want, got = (t[(t.metric == metric) & t.model.isin(models)].set_index("model").value for t in (every, sample))
        np.testing.assert_allclose(got[models].to_numpy(float), want[models].to_numpy(float), rtol=0, atol=1e-5)
    ed = sample[(sample.metric == "edistance") & (sample.model == "scpram")]
    assert np.isfinite(ed.value).all() and not np.isclose(ed.value.iloc[0],
                                                          every[(every.metric == "edistance")
                                                                & (every.model == "scpram")].value.iloc[0])
    pred_all, pred_sample = (ad.read_h5ad(tmp_path / d / "pred.h5ad") for d in ("all", "sample"))
    assert main([*args, "--out", str(tmp_path / "bad"), "--eval-cells", "5"]) == 2
    assert not (tmp_path / "bad").exists()
    assert pred_sample.n_obs == n_source and pred_sample.obs.equals(pred_all.obs)
    assert pred_sample.uns["perturbkit"]["model"] == "scpram"
    np.testing.assert_allclose(pred_sample.X, pred_all.X, rtol=0, atol=1e-5)


def test_predict_out_of_memory_stops_with_one_line_and_no_output(tmp_path, capsys, monkeypatch):
    """A step that cannot get the memory it needs (here scoring: numpy cannot allocate 32 TiB) stops with exit
    status 2 and one line naming the step and the options that shrink it; no output is written."""
    from perturbkit.cli import main

    def too_large(*args, **kwargs):
        return np.empty((1 << 20, 1 << 22))  # 32 TiB: numpy's _ArrayMemoryError, a MemoryError

    monkeypatch.setattr(pk.metrics, "evaluate_screen", too_large)
    src = write(counts(n_cells=120, n_genes=40), tmp_path / "in.h5ad")
    args = ["predict", "--data", str(src), "--model", "mean_shift", "--holdout", "a", "--n-top-genes", "20",
            "--n-boot", "0", "--no-progress"]
    for extra, fix in (([], "--backed"), (["--backed"], "--n-top-genes")):
        out = tmp_path / f"out{len(extra)}"
        capsys.readouterr()
        assert main([*args, *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: predict ran out of memory while scoring (Unable to "
                                                    "allocate"), err
        assert fix in err[0], err
        assert not any((out / name).exists() for name in ("pred.h5ad", "scores.csv", "record.json"))


def test_file_changing_while_training_reads_stops_with_one_line(tmp_path, capsys, monkeypatch):
    """The training cells are read from the file during training: a change to it between epochs stops the fit
    with the one-line error of a changed file (raised by the prefetch thread's read, handed to the step), and
    predict --backed writes no output."""
    import os

    from perturbkit.cli import main

    src = write(counts(n_cells=200, n_genes=40), tmp_path / "in.h5ad")
    spec = pk.spec.PerturbSpec()
    with ondisk.OnDisk(src) as od:
        def touch(epoch, history):  # a new modification time, as a writer would leave
            st = os.stat(src)
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

        model = pk.models.get("scgen", epochs=3, n_hidden=16, n_latent=4, batch_size=16)
        with pytest.raises(InputError, match=r"changed \(new modification time\) while it was read"):
            model.fit(od[np.arange(od.n_obs)], spec, callback=touch)
    assert model.history is None or model.history.epochs_run <= 1

    fit_predict = pk.engine.fit_predict

    def changed_cache(model, train, *args, **kwargs):  # the cache file changes before the model reads it
        st = os.stat(train.path)
        os.utime(train.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return fit_predict(model, train, *args, **kwargs)

    monkeypatch.setattr(pk.engine, "fit_predict", changed_cache)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["predict", "--data", str(src), "--model", "scgen", "--epochs", "1", "--holdout", "a", "--backed",
                 "--n-top-genes", "20", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed (new modification time) while it was read" in err[0], err
    assert not any((out / name).exists() for name in ("pred.h5ad", "scores.csv", "record.json"))


def test_scoring_that_cannot_fit_stops_before_training(tmp_path, capsys, monkeypatch):
    """The memory the scoring takes at once (every model's predictions, the metrics' float64 copies) is known
    once the task is split: more than is available stops the run before any model trains, with one line that
    says how much is needed and the options that shrink it."""
    from perturbkit import pipeline
    from perturbkit.cli import main
    from perturbkit.models import _ot

    # the lower bound: 5 models x 1 perturbation x 30 source cells x 20 genes (float32) + (40 + 2 x 30) x 20 x 8,
    # and one piece of the prediction (its 30 cells) x 20 x 8; --eval-cells caps the cells the metrics hold
    assert pipeline.scoring_bytes(30, [40], 20, 5) == 20 * (4 * 5 * 30 + 8 * (40 + 60) + 8 * 30)
    assert pipeline.scoring_bytes(30, [40], 20, 5, eval_cells=10) == 20 * (4 * 5 * 10 + 8 * (10 + 20) + 8 * 30)
    monkeypatch.setattr(_ot, "available_memory", lambda device=None: 1000)
    fitted = []
    monkeypatch.setattr(pk.engine, "fit_predict", lambda *a, **k: fitted.append(a))
    src = write(counts(n_cells=120, n_genes=40), tmp_path / "in.h5ad")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["predict", "--data", str(src), "--model", "mean_shift", "--holdout", "a", "--n-top-genes", "20",
                 "--backed", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: predict: scoring this task needs at least "), err
    assert "are available" in err[0] and "--n-top-genes" in err[0] and "--perturbed" in err[0], err
    assert "--eval-cells" in err[0], err
    assert not fitted and not (out / "pred.h5ad").exists()
