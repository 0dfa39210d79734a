"""benchmarks/scpram_attention.py --task thin builds the same cells as configs/kang.toml's unbalanced thin task
(the bench's own split), so docs/scpram.md's diagnosis is of the task docs/bench.md scores."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import perturbkit as pk
from perturbkit import bench
from perturbkit.bench.plan import plan_splits
from perturbkit.scenarios import Unbalanced

ROOT = Path(__file__).resolve().parents[1]


def test_thin_task_is_the_benchs():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its sibling compare_scpram
    try:
        spec_ = importlib.util.spec_from_file_location("scpram_attention", ROOT / "benchmarks" / "scpram_attention.py")
        mod = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    cfg = bench.load_config(ROOT / "configs" / "kang.toml")
    conf = dict(cfg.active())[Unbalanced]
    assert tuple(conf.thin_contexts) == mod.THIN_CONTEXTS and conf.thin_fraction == mod.THIN_FRACTION
    assert conf.data_seed == 0 and not conf.thin_target
    spec = pk.PerturbSpec(condition_key="condition", control="control", perturbed="stimulated",
                          context_key="cell_type")
    name, train, source, target = mod.thin_task(pk, spec, "CD14+ Monocytes")
    adata, _ = pk.data.preprocess(pk.data.load("kang2018"), log=lambda *a, **k: None)
    sd = next(s for s in plan_splits(cfg, adata) if s.scenario == "unbalanced" and s.key == "thin_cd14_monocytes")
    split = Unbalanced.split(sd, adata, spec)
    for mine, theirs in ((train, split.train), (source, split.source), (target, split.target)):
        assert list(mine.obs_names) == list(adata.obs_names[theirs])
    assert name == sd.name
