"""One engine and one execution context (issue #19): the shape the engine returns, the context reaching it, the
device errors, tune on a screen, and the import layering of the package."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, SMALL_TOML, synthetic

import perturbkit as pk
from perturbkit import engine, execution
from perturbkit.errors import InputError

SRC = Path(__file__).resolve().parents[1] / "src" / "perturbkit"
HAS_CUDA = execution.available()[0].startswith("cuda")


# ------------------------------------------------------------------------------------------------ context


def test_auto_resolves_to_the_best_device_here():
    ex = execution.resolve("auto")
    assert ex.device == execution.available()[0]
    if not HAS_CUDA:
        assert ex.device in ("cpu", "mps") and not ex.graphs


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device: the missing-device error cannot happen")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_missing_device_is_one_clear_error(device):
    with pytest.raises(InputError, match=rf"device '{re.escape(device)}' is not available on this machine .*sees: "
                       r".*cpu"):
        execution.resolve(device)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "", 3])
def test_a_malformed_device_names_the_choices(bad):
    with pytest.raises(InputError, match="device must be one of 'auto', 'cpu'"):
        execution.resolve(bad)


def test_threads_are_set_inside_and_restored():
    import torch

    before = torch.get_num_threads()
    with execution.resolve("cpu", threads=1).activate() as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(InputError, match="threads must be >= 1"):
        execution.resolve("cpu", threads=0)


def test_describe_names_device_and_guarantee():
    d = execution.resolve("cpu", threads=2).describe()
    assert d["device"] == "cpu" and d["threads"] == 2 and d["device_name"]
    assert d["guarantee"].startswith("byte-identical")
    json.dumps(d)


# ------------------------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def screen():
    adata = pk.data.synthetic_screen(n_contexts=3, n_cells=30, n_genes=30, n_responsive=5, seed=0)
    spec = pk.data.PerturbSpec(perturbed="all")
    return adata, spec


def test_one_shape_for_two_conditions_and_for_a_screen(screen):
    """A two-condition data set is a screen of one: the same call, the same Fitted."""
    single = synthetic()
    spec1 = pk.data.PerturbSpec()
    t1 = pk.split.holdout_context(single, spec1, "ctx2")
    adata, spec = screen
    t2 = pk.split.holdout_context(adata, spec, "ctx0")
    for data, s, task in ((single, spec1, t1), (adata, spec, t2)):
        perts = engine.task_perturbations(task, s)
        train, source, _target = task.subsets(data)
        fitted = engine.fit_predict(pk.models.get("mean_shift"), train, source, s, perts, seed=0,
                                    execution=execution.resolve("cpu"))
        assert isinstance(fitted, engine.Fitted) and list(fitted.preds) == perts and not fitted.cannot
        pred = fitted.pred()
        assert pred.n_obs == len(perts) * source.n_obs
        assert set(pred.obs[s.condition_key]) == set(perts)
        assert fitted.execution.device == "cpu" and fitted.timings.keys() == {"fit_s", "predict_s"}
    assert engine.task_perturbations(t1, spec1) == ["stimulated"]


def test_the_context_reaches_the_model_and_explicit_cpu_is_the_default_path():
    adata, spec = synthetic(), pk.data.PerturbSpec()
    task = pk.split.holdout_context(adata, spec, "ctx2")
    train, source, _ = task.subsets(adata)
    out = []
    for ex in (None, execution.resolve("cpu", threads=1), execution.Execution(threads=1)):
        model = pk.models.get("scgen", epochs=2, **SMALL)
        fitted = engine.fit_predict(model, train, source, spec, ["stimulated"], seed=0, execution=ex)
        assert fitted.model.execution.device == "cpu"
        out.append(np.asarray(fitted.pred().X))
    assert np.array_equal(out[1], out[2])
    assert fitted.threads == 1


def test_cannot_lists_what_a_model_cannot_predict(screen):
    adata, spec = screen
    task = pk.split.holdout_combination(adata, spec, "A+B")
    perts = engine.task_perturbations(task, spec)
    train, source, _ = task.subsets(adata)
    fitted = engine.fit_predict(pk.models.get("mean_shift"), train, source, spec, perts, seed=0)
    assert "A+B" in fitted.cannot and "cannot predict the unseen combination" in fitted.cannot["A+B"]
    assert engine.fit_predict(pk.models.get("additive"), train, source, spec, perts, seed=0).cannot == {}


def test_bad_engine_arguments_are_input_errors():
    adata, spec = synthetic(), pk.data.PerturbSpec()
    train, source, _ = pk.split.holdout_context(adata, spec, "ctx2").subsets(adata)
    with pytest.raises(InputError, match="perturbations must be a non-empty list"):
        engine.fit_predict(pk.models.get("control"), train, source, spec, "stimulated", seed=0)
    with pytest.raises(InputError, match="execution must be a perturbkit.execution.Execution"):
        engine.fit_predict(pk.models.get("control"), train, source, spec, ["stimulated"], seed=0, execution="cpu")


# ---------------------------------------------------------------------------------------- command line


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device: --device cuda works here")
def test_predict_on_a_missing_device_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "perturbkit", "predict", "--holdout", "CD4 T cells", "--device",
                        "cuda", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("error: --device 'cuda' is not available on this machine") and "cpu" in lines[0]
    assert not (tmp_path / "o").exists()


TUNE_SCREEN = """
seeds = [0]
[data]
source = "synthetic_screen"
perturbed = ["A", "B", "C"]
[data.synthetic_screen]
n_contexts = 3
n_cells = 30
n_genes = 30
n_responsive = 5
seed = 0
[preprocessing]
n_top_genes = 0
[training]
epochs = 2
threads = 1
device = "cpu"
[models.scgen]
{small}
[evaluation]
metrics = ["pearson_delta", "r2_mean_all"]
n_boot = 0
[tune]
holdout = "ctx0"
metric = "pearson_delta"
trials = 2
[tune.validation]
n_contexts = 1
min_cells = 5
[tune.pruner]
kind = "none"
"""


def test_tune_runs_on_a_screen(tmp_path):
    cfg = tmp_path / "tune.toml"
    cfg.write_text(TUNE_SCREEN.format(small=SMALL_TOML))
    record = pk.tune(cfg, tmp_path / "out", progress=False, log=lambda *a: None)
    assert record["study"]["states"].get("COMPLETE") == 2
    assert record["determinism"]["execution"]["device"] == "cpu"
    assert np.isfinite(record["best"]["validation_value"])
    import pandas as pd

    final = pd.read_csv(tmp_path / "out" / "final_summary.csv")
    assert {"scgen:tuned", "scgen:default", "mean_shift", "control", "ceiling"} <= set(final.model)
    assert np.isfinite(final[final.metric == "pearson_delta"]["mean"]).all()


def test_bench_config_takes_training_device():
    from perturbkit.bench.config import config_from_dict

    raw = {"data": {"source": "synthetic"}, "training": {"device": "CPU"}, "models": {"mean_shift": {}},
           "scenarios": {"loco": {}}}
    assert config_from_dict(raw).training.device == "cpu"
    raw["training"]["device"] = "tpu"
    with pytest.raises(InputError, match="training.device must be one of"):
        config_from_dict(raw)


# ---------------------------------------------------------------------------------------------- layering


def _imports() -> dict[str, set[str]]:
    """module -> the perturbkit modules it imports (at any depth of the file, lazy imports included). Importing
    ``a.b.c`` runs the package ``a.b`` first: an edge to ``a.b`` is added for importers outside it."""
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if pkg else parts)] = (f, pkg)
    edges = {m: set() for m in mods}
    for m, (f, pkg) in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = m.split(".")[: len(m.split(".")) - (node.level - 1) - (0 if pkg else 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("perturbkit"):
                target = node.module
            else:
                continue
            for alias in node.names:
                t = f"{target}.{alias.name}" if f"{target}.{alias.name}" in mods else target
                if t not in mods:
                    continue
                edges[m].add(t)
                parts = t.split(".")
                for k in range(2, len(parts)):
                    parent = ".".join(parts[:k])
                    if not m.startswith(parent + ".") and m != parent:
                        edges[m].add(parent)
    return edges


def test_no_import_circle_in_the_package():
    edges = _imports()
    seen, cycles = {}, []

    def visit(v, path):
        seen[v] = 1
        for w in sorted(edges[v]):
            if seen.get(w) == 1:
                cycles.append(path[path.index(w):] + [w])
            elif w not in seen:
                visit(w, path + [w])
        seen[v] = 2

    for v in sorted(edges):
        if v not in seen:
            visit(v, [v])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_nothing_below_bench_imports_it():
    allowed = ("perturbkit.bench", "perturbkit.cli", "perturbkit.__main__")
    bad = {m: sorted(t for t in ts if t == "perturbkit.bench" or t.startswith("perturbkit.bench."))
           for m, ts in _imports().items() if not m.startswith(allowed)}
    assert not {m: t for m, t in bad.items() if t}


def test_two_conditions_are_not_a_second_code_path():
    """'One label or a list' is asked only where it is a rule of the input, never to pick a code path: the spec, its
    validation (data.py), the config checks that refuse a combination scenario on one label or a one-label
    scenario on a screen, and the reading of cells written by an earlier perturbkit (bench/aggregate.py). The
    splits, predict, bench, tune and the models run one path."""
    hits = subprocess.run(["grep", "-rnE", r"perts is None|\.single\b", str(SRC)], capture_output=True,
                          text=True).stdout.splitlines()
    files = sorted({Path(h.split(":", 1)[0]).name for h in hits})
    assert len(hits) <= 6, "\n".join(hits)
    assert set(files) <= {"spec.py", "data.py", "config.py", "unseen_combination.py", "aggregate.py"}, files


def test_import_stays_light():
    r = subprocess.run([sys.executable, "-c", "import perturbkit, perturbkit.engine, perturbkit.execution, sys; "
                        "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("name, old_key", [("mean_shift", "shift"), ("scgen", "delta"), ("scpram", "paired_delta")])
def test_saves_of_the_earlier_one_perturbation_layout_still_load(tmp_path, name, old_key):
    """One perturbation is saved in the layout of a screen now ("shift/stimulated"); a save of the earlier
    layout ("shift") loads and predicts the same."""
    from safetensors.numpy import load_file, save_file

    adata, spec = synthetic(), pk.data.PerturbSpec()
    train, source, _ = pk.split.holdout_context(adata, spec, "ctx2").subsets(adata)
    params = {} if name == "mean_shift" else {"epochs": 2, **SMALL}
    with execution.Execution(threads=1).activate():
        model = pk.models.get(name, **params).fit(train, spec, seed=0)
        want = np.asarray(model.predict(source).X)
        path = model.save(tmp_path / "m")
        arrays = load_file(str(path / "weights.safetensors"))
        new = [k for k in arrays if k.endswith((f"{old_key}/stimulated", f"p/stimulated/{old_key}"))]
        assert new, sorted(arrays)
        old = {}
        for k, v in arrays.items():
            if k.endswith("control_index"):
                continue
            old[k.replace("p/stimulated/", "").replace("/stimulated", "")] = v
        save_file(old, str(path / "weights.safetensors"))
        got = np.asarray(pk.models.Model.load(path).predict(source).X)
    assert np.array_equal(got, want)
