"""benchmarks/scpram_attention.py --task thin and benchmarks/cellot_composition.py diagnose configs/kang.toml's
unbalanced tasks through one helper, ``compare_scpram.unbalanced_tasks``, which must hand back the bench's own
tasks, so docs/scpram.md's and docs/cellot.md's diagnoses are of the cells docs/bench.md scores."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import benchmark_script

import perturbkit as pk
from perturbkit import bench
from perturbkit.bench.plan import plan_splits

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT = "CD14+ Monocytes"


def _share(train, spec, condition: str, context: str) -> float:
    obs = train.obs
    cond = obs[spec.condition_key].astype(str) == condition
    return float((obs.loc[cond, spec.context_key].astype(str) == context).mean())


def test_unbalanced_tasks_are_the_benchs():
    mod = benchmark_script("compare_scpram")
    for script in ("scpram_attention", "cellot_composition"):
        assert benchmark_script(script).unbalanced_tasks is not None  # both scripts import the one helper
    tasks = mod.unbalanced_tasks(pk, HOLDOUT, ["thin", "keep"])
    adata, _ = pk.data.preprocess(pk.data.load("kang2018"), log=lambda *a, **k: None)
    cfg = bench.load_config(ROOT / "configs" / "kang.toml")
    names = [s.name for s in plan_splits(cfg, adata) if s.scenario == "unbalanced" and s.context == HOLDOUT
             and s.variant in ("thin", "keep")]
    assert [t[1] for t in tasks] == names and sorted(t[0] for t in tasks) == ["keep", "thin"]
    for variant, _, train, source, target, spec in tasks:
        ctx = spec.context_key
        assert set(target.obs[ctx].astype(str)) == {HOLDOUT} == set(source.obs[ctx].astype(str))
        assert set(target.obs[spec.condition_key].astype(str)) == {spec.perturbed}
        assert set(source.obs[spec.condition_key].astype(str)) == {spec.control}
        held = (train.obs[ctx].astype(str) == HOLDOUT) & (train.obs[spec.condition_key].astype(str) == spec.perturbed)
        assert not held.any()
        stim = _share(train, spec, spec.perturbed, "FCGR3A+ Monocytes")
        ctrl = _share(train, spec, spec.control, "FCGR3A+ Monocytes")
        if variant == "thin":  # the composition change the diagnoses are about
            assert stim < 0.5 * ctrl
        else:
            assert stim > 0.8 * ctrl
    with pytest.raises(SystemExit, match="thinner"):
        mod.unbalanced_tasks(pk, HOLDOUT, ["thinner"])
