"""The three tutorials run top to bottom without error, each within its time budget, and show what they
promise.

Each jupytext script of ``tutorials/`` is executed once per test session by :func:`executed` (nbclient, a
fresh kernel, a temporary working directory), which writes the executed notebook with its figures to
``docs/tutorials/NAME.ipynb``: the input of the documentation that tests/test_docs.py builds from the same
copies, so CI executes every notebook once.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_notebooks_module():
    """``docs/notebooks.py`` (the executor ``make docs`` also uses) as a module."""
    spec = importlib.util.spec_from_file_location("perturbkit_docs_notebooks", ROOT / "docs" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NOTEBOOKS = load_notebooks_module()
NAMES = NOTEBOOKS.names()


@functools.cache
def executed(name: str):
    """(executed notebook, wall seconds, the error or None) of ``tutorials/NAME.py``, run once per session."""
    try:
        nb, seconds = NOTEBOOKS.execute(name)
        return nb, seconds, None
    except Exception as exc:  # CellExecutionError, CellTimeoutError, DeadKernelError: reported by the test
        import nbformat

        return nbformat.read(NOTEBOOKS.OUT / f"{name}.ipynb", as_version=4), float("nan"), exc


def outputs(nb, marker: str) -> list[dict]:
    """The outputs of the code cells whose source contains ``marker``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert cells, f"no code cell contains {marker!r}"
    return [o for c in cells for o in c.get("outputs", [])]


def has_figure(nb, marker: str) -> bool:
    return any("image/png" in o.get("data", {}) for o in outputs(nb, marker))


def has_table(nb, marker: str) -> bool:
    return any("text/html" in o.get("data", {}) for o in outputs(nb, marker))


#: per tutorial: what it promises -> (a piece of the source of the code cell showing it, "figure" or "table")
PROMISED = {
    "01_scgen": {
        "cells per cell type and condition": ("pd.crosstab(raw.obs", "table"),
        "UMAP of all cells by cell type and condition": ("sc.tl.umap(view", "figure"),
        "PCA of control, real and predicted cells": ('basis="pca"', "figure"),
        "UMAP of control, real and predicted cells": ('basis="umap"', "figure"),
        "per-gene means and variances, top DEGs labelled": ("pk.pl.reg_var(", "figure"),
        "violins of the top responding genes": ("pk.pl.deg_violins(", "figure"),
        "metric table with baselines and the ceiling": ("metrics.score_models(", "table"),
        "the genes the decoded latent delta moves most": ("decoded latent delta", "figure"),
    },
    "02_scpram": {
        "OT solve record": ('model.fit_info["ot"]', "table"),
        "Sinkhorn convergence": ("Sinkhorn convergence", "figure"),
        "pairing cost": ("how far the OT partner is", "figure"),
        "paired cells in latent space": ("OT pairs: control cell", "figure"),
        "attention heatmap": ("pk.pl.attention_heatmap(", "figure"),
        "per-cell vs first_cell attention, measured": ('"first_cell"', "table"),
        "ratio as a knob": ("ratios = [", "table"),
        "ratio sweep figure": ("delta spread", "figure"),
        "metric table with baselines and the ceiling": ("metrics.score_models(", "table"),
    },
    "03_benchmarking": {
        "seeds, one dot per seed": ("pk.pl.seed_variability(", "figure"),
        "cell-type specificity over seven types": ("pk.pl.context_scores(", "figure"),
        "balanced vs unbalanced": ("pk.pl.unbalanced_comparison(", "figure"),
        "DEG overlap": ("top_k_overlap", "table"),
        "cross-donor transfer": ('summary.scenario == "cross_donor"', "table"),
        "tuning history on the validation task": ("pk.pl.optimization_history(", "figure"),
        "hyperparameter importance": ("pk.pl.param_importance(", "figure"),
        "tuned vs default over seeds": ("final_summary.csv", "table"),
        "the shipped full benchmark, labelled": ("kang_bench.md", "table"),
    },
}


def test_every_tutorial_is_checked():
    assert NAMES == sorted(PROMISED), "a tutorial without its promised outputs (or the other way round)"


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_runs_without_error_within_budget(name):
    nb, seconds, error = executed(name)
    assert error is None, f"{name}: {type(error).__name__}: {error}"
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    runtime = NOTEBOOKS.printed_runtime(nb)
    assert runtime is not None, f"{name}: the last cell must print 'runtime: N s'"
    assert runtime <= seconds, (runtime, seconds)
    # the 5-minute aim (NOTEBOOKS.BUDGET_S) is a speed target: measured and printed, not asserted (timings belong
    # in benchmarks, not in unit tests that a loaded CI machine would fail)


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_shows_what_it_promises(name):
    nb, _, error = executed(name)
    if error is not None:
        pytest.fail(f"{name} did not run: {error}")
    missing = [what for what, (marker, kind) in PROMISED[name].items()
               if not (has_figure(nb, marker) if kind == "figure" else has_table(nb, marker))]
    assert not missing, f"{name}: no output for {missing}"
    copy = NOTEBOOKS.OUT / f"{name}.ipynb"
    assert copy.exists() and copy.stat().st_mtime >= (ROOT / "tutorials" / f"{name}.py").stat().st_mtime


#: a decimal number with two or more places, as a score would be quoted
TYPED_NUMBER = re.compile(r"(?<![\w.])\d+\.\d{2,}(?![\w.])")


@pytest.mark.parametrize("name", NAMES)
def test_prose_quotes_no_typed_scores(name):
    """Numbers quoted in the prose are computed in the notebook: markdown cells hold no decimal numbers with
    two or more places (the figures of a run are printed by code cells or by ``display(Markdown(...))``)."""
    import jupytext

    nb = jupytext.read(ROOT / "tutorials" / f"{name}.py")
    typed = [(i, m) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
             for m in TYPED_NUMBER.findall(c.source)]
    assert not typed, f"{name}: numbers typed into markdown cells (cell index, number): {typed}"


def test_scripts_are_percent_scripts_without_outputs():
    """One convention: jupytext percent scripts; no notebook is committed under tutorials/ (a copy converted
    to open in Jupyter is ignored by git)."""
    import subprocess

    import jupytext

    listed = subprocess.run(["git", "ls-files", "tutorials"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        assert not [f for f in listed.stdout.split() if f.endswith(".ipynb")]
    ignored = subprocess.run(["git", "check-ignore", "-q", "tutorials/01_scgen.ipynb"], cwd=ROOT)
    assert ignored.returncode in (0, 128), "tutorials/*.ipynb must be ignored by git"
    for name in NAMES:
        text = (ROOT / "tutorials" / f"{name}.py").read_text()
        assert "format_name: percent" in text
        nb = jupytext.reads(text, fmt="py:percent")
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# Tutorial")
        assert "runtime:" in nb.cells[-1].source
