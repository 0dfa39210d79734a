"""The benchmark harness: one TOML config -> one run directory of scores, summaries, figures and an RO-Crate.

Read it in this order:

1. :mod:`.config`: :func:`load_config` turns ``CONFIG.toml`` into a frozen :class:`BenchConfig` (unknown or
   mistyped settings are refused with the setting's full name and a close-match suggestion). The tables shared
   with tune configs come from :mod:`perturbkit.config`; ``[scenarios.NAME]`` is a mapping over the scenario
   registry :data:`perturbkit.scenarios.SCENARIOS`.
2. :mod:`.plan`: :func:`plan` asks each configured scenario, in registry order, for its tasks and expands them
   into *cells*: one (scenario, split, model, seed) each. Baselines (``control``, ``mean_shift``) are models
   like any other and get cells on every split.
3. :mod:`.data`: :class:`Context`, the preprocessed data (made once per run directory, cached in
   ``DIR/.cache``) and the splits (made by each task's scenario).
4. :mod:`.execute`: :func:`run_cell` runs one cell: split -> :func:`perturbkit.engine.fit_predict` ->
   :func:`perturbkit.metrics.evaluate_screen` -> the files of ``DIR/cells/<cell id>/`` (every file written to a temporary
   name and renamed; ``result.json`` last, so a cell with a ``result.json`` is finished and complete).
   :func:`run` = ``check the directory -> every unfinished cell (in worker processes with jobs > 1) ->
   aggregate``; a rerun of the same config into the same directory skips the finished cells.
5. :mod:`.aggregate`: :func:`aggregate` reads the finished cells and writes ``scores.csv``, ``summary.csv``,
   each scenario's tables, ``figures/`` (:mod:`.figures`), ``run.json``, ``report.html``
   (:mod:`perturbkit.report`) and ``ro-crate-metadata.json``.

The command line exposes every step separately (``--list-cells``, ``--cell ID``, ``--aggregate``) so that a
workflow engine can run the cells as parallel jobs; see docs/bench.md. A new scenario is a module of
:mod:`perturbkit.scenarios`; nothing here names one.
"""

from __future__ import annotations

from .aggregate import aggregate, collect, headline, summarise, tidy_scores, write_crate
from .config import BenchConfig, OutputConfig, config_from_dict, config_hash, load_config, same_run, to_toml
from .data import Context
from .execute import CellsFailed, run, run_cell
from .plan import Cell, list_cells, plan, plan_splits
from .rundir import (CACHE_DIR, CELLS_DIR, RUN_KIND, SCORE_COLUMNS, SUMMARY_COLUMNS, cell_dir, cell_result,
                     prepare_dir)

__all__ = ["CACHE_DIR", "CELLS_DIR", "RUN_KIND", "SCORE_COLUMNS", "SUMMARY_COLUMNS", "BenchConfig", "Cell",
           "CellsFailed", "Context", "OutputConfig", "aggregate", "cell_dir", "cell_result", "collect",
           "config_from_dict", "config_hash", "headline", "list_cells", "load_config", "plan", "plan_splits",
           "prepare_dir", "run", "run_cell", "same_run", "summarise", "tidy_scores", "to_toml", "write_crate"]
