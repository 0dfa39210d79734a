"""The run directory: its guard (a new, empty or same-config directory), its identity files
(``config.json``, ``config.toml``) and where each cell's files live (``cells/<id>/``, finished when its
``result.json`` is there)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import BenchConfig, to_toml

RUN_KIND = "perturbkit.bench"
CELLS_DIR = "cells"
CACHE_DIR = ".cache"
#: the columns of every cell's scores.csv and of the run's scores.csv
SCORE_COLUMNS = ("scenario", "split", "model", "seed", "metric", "value", "ci_low", "ci_high",
                 "higher_is_better", "error", "context", "perturbation", "variant", "n_train", "n_source",
                 "n_target")
SUMMARY_COLUMNS = ("scenario", "split", "model", "perturbation", "metric", "n_seeds", "mean", "sd", "ci_low",
                   "ci_high", "rank", "higher_is_better")


def prepare_dir(cfg: BenchConfig, out: str | Path, *, config_text: str | None = None) -> Path:
    """Make ``out`` the run directory of ``cfg``, or refuse: it must be new, empty, or a run of the same
    config.

    Writes ``config.json`` (the normalised config: the run's identity) and ``config.toml`` (the config as
    given, or rendered from ``cfg``). Safe to call from several processes at once (same content, atomic).
    A ``config.json`` written by an earlier perturbkit that lacks only settings added since, at their
    defaults, is the same config (:func:`~perturbkit.bench.config.same_run`); it is rewritten in the current
    form.
    """
    from .. import _io, config
    from .config import same_run

    out = Path(out)
    cfg_dict = cfg.to_dict()

    def same_config(folder: Path, entries: list[str]) -> bool:
        cfile = folder / "config.json"
        if not cfile.exists():
            return False
        old = _io.read_json(cfile)
        if not same_run(old, cfg_dict):
            diff = (config.first_difference(old, cfg_dict) if isinstance(old, dict)
                    else "config.json is unreadable")
            raise InputError(f"--out {str(folder)!r} holds a bench run of a different config ({diff}). Use a "
                             "new directory for a changed config, or rerun the same config to resume.")
        return True

    _io.check_out(out, accepts=same_config, what="another tool: it is not a perturbkit bench run")
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(cfg_dict, indent=2) + "\n"
    if not (out / "config.json").exists() or (out / "config.json").read_text() != text:
        _io.atomic_write_text(out / "config.json", text)
    if not (out / "config.toml").exists():
        _io.atomic_write_text(out / "config.toml", config_text if config_text is not None else to_toml(cfg))
    return out


def cell_dir(out: str | Path, cell) -> Path:
    """``out/cells/<id>`` of a cell (or a cell id)."""
    return Path(out) / CELLS_DIR / (cell if isinstance(cell, str) else cell.id)


def cell_result(out: str | Path, cell) -> dict[str, Any] | None:
    """The finished cell's ``result.json``, or None when the cell has not finished."""
    from .._io import read_json

    return read_json(cell_dir(out, cell) / "result.json")
