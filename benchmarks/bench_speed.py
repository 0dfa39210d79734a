"""Training speed of the VAE models on Kang (2,000 HVGs, CD4 T held out) next to the compute floor.

The floor is the time the same matrix products take on this machine: for every training step, each Linear
layer's forward product (batch x in @ in x out) and its two backward products (grad of the input, except for
the first layer, and grad of the weight), timed with plain ``torch.mm`` on tensors of the same shapes and the
same thread count. Everything else a step does (activations, batch norm, dropout, the loss, Adam) is overhead.

Usage::

    .venv/bin/python benchmarks/bench_speed.py [--epochs 3] [--models scgen,scpram] [--threads N]

Prints a markdown table and writes it to ``benchmarks/results/speed.md``. Not a test: run on demand.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path


def linear_shapes(module) -> list[tuple[int, int]]:
    from torch import nn

    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def floor_seconds(shapes, batch: int, n_batches: int, first_in: int, repeats: int = 1) -> float:
    """Seconds of the forward + backward matrix products of ``n_batches`` steps (one epoch)."""
    import torch

    mats = []
    for n_in, n_out in shapes:  # nn.Linear's layouts: weight (out x in), y = x @ w.T
        x, w, dy = torch.randn(batch, n_in), torch.randn(n_out, n_in), torch.randn(batch, n_out)
        mats.append((x, w, dy, n_in != first_in))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n_batches):
            for x, w, dy, need_dx in mats:
                torch.mm(x, w.t())  # forward
                torch.mm(dy.t(), x)  # grad of the weight
                if need_dx:
                    torch.mm(dy, w)  # grad of the input
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", default="scgen,scpram")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default=None, help="float32, bfloat16 or auto (default: each model's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.md"))
    args = parser.parse_args()

    import torch

    from perturbkit import data, models, split
    from perturbkit._io import atomic_write_text
    from perturbkit.models._train import Rows, train_vae
    from perturbkit.models._vae import VAE

    if args.threads:
        torch.set_num_threads(args.threads)
    adata, _ = data.preprocess(data.load("kang2018"), log=lambda *a: None)
    spec = data.DATASETS["kang2018"].spec
    train, _, _ = split.holdout_cell_type(adata, spec, "CD4 T cells").subsets(adata)
    X = Rows(train.X)
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        if name not in models.MODELS:
            print(f"skipping {name}: not registered")
            continue
        extra = {"precision": args.precision} if args.precision else {}
        model = models.get(name, epochs=args.epochs, patience=10**6, **extra)
        module = VAE(model._vae_config(X.shape[1]))
        tcfg = model._train_config()
        hist = train_vae(module, X, tcfg, seed=0, progress=False)
        bs = tcfg.batch_size
        n_batches = -(-hist.n_train // bs)
        per_epoch = hist.seconds / hist.epochs_run
        floor = floor_seconds(linear_shapes(module), bs, n_batches, X.shape[1], repeats=2)
        rows.append((name, torch.get_num_threads(), bs, n_batches, per_epoch, floor, per_epoch / floor,
                     hist.precision))
        print(f"{name}: {per_epoch:.2f} s/epoch, floor {floor:.2f} s/epoch, ratio {per_epoch / floor:.2f}")
    lines = [
        f"Kang 2018, CD4 T held out, {X.shape[0]} training cells x {X.shape[1]} genes, {args.epochs} epochs; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "",
        "The floor is float32 matrix products; a bfloat16 run can beat it.",
        "",
        "| model | precision | threads | batch | steps/epoch | s/epoch | floor s/epoch | ratio |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r[0]} | {r[7]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} |" for r in rows],
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write_text(Path(args.out), table)


if __name__ == "__main__":
    main()
