"""Where CellOT sends the held-out cells on Kang's unbalanced tasks: the cell types its transported latents land
among, against those of the real perturbed cells.

configs/kang.toml's unbalanced task with CD14+ Monocytes held out has two variants: ``keep`` keeps 20 % of every
cell type's stimulated training cells (the composition of the stimulated cells unchanged), ``thin`` keeps 10 % of
the two monocyte types' only. At 10 epochs CellOT's pearson_delta is 0.929 under ``keep`` and 0.526 under
``thin`` (benchmarks/results/kang_bench.md). CellOT learns one map that moves the whole control distribution
onto the whole stimulated one; this script measures where that map sends the held-out CD14+ control cells.

Per variant and seed it fits CellOT (10 epochs, one torch thread) on the bench's own split
(``scenarios.Unbalanced.split`` of configs/kang.toml), scores its prediction (``perturbkit.metrics.evaluate``, no
bootstrap; the bench cell's score, to rounding), and labels each latent by the majority cell type of its ``--k``
nearest stimulated *training* latents (Euclidean, the autoencoder's posterior means):

- the held-out control cells after the map (``transported``);
- the real held-out stimulated cells (``real``), encoded by the same autoencoder: where the map should send them;
- the share of each type among the stimulated and the control training cells.

Run::

    nice -n 5 .venv/bin/python benchmarks/cellot_composition.py --seeds 0 --out benchmarks/results/cellot_composition.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_scpram import unbalanced_tasks  # noqa: E402  (the bench's own split of configs/kang.toml)

METRICS = ("r2_mean_all", "r2_mean_top100", "pearson_delta")


def nearest_types(z_ref, types_ref, z, k: int) -> np.ndarray:
    """The majority type among the ``k`` nearest rows of ``z_ref`` of each row of ``z``."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k).fit(z_ref).kneighbors(z, return_distance=False)
    labels = types_ref[idx]
    out = []
    for row in labels:
        values, counts = np.unique(row, return_counts=True)
        out.append(values[np.argmax(counts)])
    return np.asarray(out)


def shares(labels, order) -> dict[str, float]:
    labels = np.asarray(labels)
    return {t: float((labels == t).mean()) for t in order}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--holdout", default="CD14+ Monocytes")
    p.add_argument("--variants", nargs="+", default=["keep", "thin"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import perturbkit as pk
    from perturbkit.record import stamp

    started = stamp()
    lines = [f"Command: `nice -n 5 .venv/bin/python benchmarks/cellot_composition.py {shlex.join(sys.argv[1:])}` "
             f"({started}; {a.epochs} epochs, 1 torch thread; held out: {a.holdout}; labels: majority of the "
             f"{a.k} nearest stimulated training latents).", ""]
    for variant, _, train, source, target, spec in unbalanced_tasks(pk, a.holdout, a.variants):
        cond = train.obs[spec.condition_key].astype(str).to_numpy()
        ctx = train.obs[spec.context_key].astype(str).to_numpy()
        stim, ctrl = cond == spec.perturbed, cond == spec.control
        order = sorted(np.unique(ctx))
        for seed in a.seeds:
            t0 = time.perf_counter()
            model = pk.models.CellOT(epochs=a.epochs).fit(train, spec, seed=seed, progress=False)
            pred = model.predict(source)
            table = pk.metrics.evaluate(target, pred, source, None, list(METRICS), n_boot=0, seed=seed)
            scores = dict(zip(table["metric"], table["value"].astype(float)))
            z_train = model.latent(train)
            moved = nearest_types(z_train[stim], ctx[stim], model.transport(model.latent(source)), a.k)
            real = nearest_types(z_train[stim], ctx[stim], model.latent(target), a.k)
            s_moved, s_real = shares(moved, order), shares(real, order)
            s_stim, s_ctrl = shares(ctx[stim], order), shares(ctx[ctrl], order)
            print(f"{variant} seed {seed} ({time.perf_counter() - t0:.0f} s): pearson_delta "
                  f"{scores['pearson_delta']:.4f}", flush=True)
            lines += [f"**{variant}**, seed {seed}: " + ", ".join(f"{m} {scores[m]:.4f}" for m in METRICS)
                      + f"; {int(stim.sum()):,} stimulated and {int(ctrl.sum()):,} control training cells.", "",
                      "| training cell type | share of stimulated training cells | share of control training "
                      "cells | held-out control cells after the map, nearest | real held-out stimulated cells, "
                      "nearest |", "|---|---|---|---|---|"]
            lines += [f"| {t} | {s_stim[t]:.3f} | {s_ctrl[t]:.3f} | {s_moved[t]:.3f} | {s_real[t]:.3f} |"
                      for t in order]
            lines.append("")
    text = "\n".join(lines)
    print(text)
    if a.out:
        from perturbkit._io import atomic_write_text

        atomic_write_text(a.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
