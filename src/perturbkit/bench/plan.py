"""The plan: every scenario's tasks (in registry order) x the models x the seeds = the cells of a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..scenarios import SplitDef
from .config import BenchConfig, load_config
from .data import Context
from .rundir import cell_result


@dataclass(frozen=True)
class Cell:
    """One (scenario, split, model, seed) unit of work; ``id`` names its folder ``cells/<id>``."""

    split: SplitDef
    model: str  # the model label
    seed: int

    @property
    def scenario(self) -> str:
        return self.split.scenario

    @property
    def id(self) -> str:
        return f"{self.split.scenario}.{self.split.key}.{self.model}.s{self.seed}"


def plan_splits(cfg: BenchConfig, adata) -> list[SplitDef]:
    """Every held-out task of the configured scenarios, in a fixed order (from the cells of each scenario's
    ``filter``)."""
    from ..scenarios import filtered_rows

    out: list[SplitDef] = []
    for scenario, conf in cfg.active():
        where = scenario.cells_filter(conf)
        cells = adata[filtered_rows(adata, where, f"scenarios.{scenario.name}.filter")] if where else adata
        out += scenario.plan(conf, cfg, cells, list(out))
    return out


def runs(cfg: BenchConfig, split: SplitDef, label: str) -> bool:
    """Whether the model ``label`` gets cells on the task ``split`` (its scenario decides:
    :meth:`~perturbkit.scenarios.Scenario.runs`)."""
    from ..models import MODELS
    from ..scenarios import SCENARIOS

    return SCENARIOS[split.scenario].runs(split, MODELS[cfg.model(label).model], cfg.data.spec)


def plan(cfg: BenchConfig, adata) -> list[Cell]:
    """Every cell of the benchmark: splits x models x seeds, in run order (split, then seed, then model); a
    model gets no cells on a task it does not apply to (:func:`runs`: ``mean_shift`` on an unseen combination,
    ``additive`` where no combination is predicted)."""
    splits = plan_splits(cfg, adata)
    return [Cell(s, m.label, seed) for s in splits for seed in cfg.seeds for m in cfg.models
            if runs(cfg, s, m.label)]


def splits_of(cells: list[Cell]) -> list[SplitDef]:
    """The tasks of ``cells``, in plan order."""
    return list(dict.fromkeys(c.split for c in cells))


def keeps_prediction(cfg: BenchConfig, cell: Cell, splits: list[SplitDef]) -> bool:
    """Whether a cell keeps its prediction for the example figures (a scenario asks for it)."""
    return cfg.output.figures and any(s.keeps_prediction(cfg, cell, splits) for s, _conf in cfg.active())


def keeps_degs(cfg: BenchConfig, cell: Cell, splits: list[SplitDef]) -> bool:
    """Whether a cell records its real and predicted top DEGs (a scenario's tables need them)."""
    return any(s.keeps_degs(cfg, cell, splits) for s, _conf in cfg.active())


def ceiling_model(cfg: BenchConfig, split: SplitDef | None = None) -> str:
    """The model whose cells also score the ceiling (and, in a screen, test each perturbation's effect) on
    ``split``: the control baseline, else the first model that runs there."""
    control = control_label(cfg)
    if control is not None and (split is None or runs(cfg, split, control)):
        return control
    chosen = (m.label for m in cfg.models if split is None or runs(cfg, split, m.label))
    return next(chosen, cfg.models[0].label)


def control_label(cfg: BenchConfig) -> str | None:
    """The label of the plain control baseline (the normalisation's 0), or None."""
    return next((m.label for m in cfg.models if m.model == "control" and not m.params), None)


def list_cells(config: BenchConfig | str | Path, out: str | Path | None = None, *,
               as_dicts: bool = False) -> list:
    """The cell ids of a config in run order (``as_dicts``: with scenario, split, context, model, seed and,
    when ``out`` is given, whether the cell has finished there). Reads the input's obs; runs nothing."""
    cfg = config if isinstance(config, BenchConfig) else load_config(config)
    cells = plan(cfg, Context(cfg, out, log=lambda *a: None).planning_data())
    if not as_dicts:
        return [c.id for c in cells]
    return [{"id": c.id, "scenario": c.scenario, "split": c.split.name, "context": c.split.context,
             "model": c.model, "seed": c.seed,
             "finished": out is not None and cell_result(Path(out), c) is not None} for c in cells]
