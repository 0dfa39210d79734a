"""CellOT (Bunne et al., Nat Methods 2023): neural optimal transport between control and perturbed cells.

The method as the reference code (github.com/bunnech/cellot, the paper's implementation) runs it on
single-cell RNA data:

1. an autoencoder embeds every training cell (the reference trains its "scgen" autoencoder first and runs
   CellOT on its codes: ``configs/tasks/*`` with ``data.ae_emb``);
2. per perturbation, two input-convex neural networks (ICNNs) ``f`` and ``g`` are trained on the latents by the
   minimax dual of the Wasserstein-2 problem: ``g``'s gradient ``T(x) = grad g(x)`` transports control cells
   ``x``; ``g`` minimises ``f(T(x)) - <x, T(x)>``, ``f`` minimises ``f(y) - f(T(x))`` for perturbed cells ``y``;
3. the prediction of a control cell is its transported latent ``T(x)``, decoded.

No cell-type labels enter the transport: it maps the distribution of control cells onto that of the
perturbed cells. Settings and every difference from the reference are in docs/cellot.md.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..data import PerturbSpec
from ..errors import InputError, InputWarning
from ._vaemodel import VAEModel, training_warnings

SOURCE_CONTEXTS = ("paired", "all")
#: the RBF bandwidths of the reference's model selection (``cellot/losses/mmd.py``: ``compute_scalar_mmd``)
MMD_GAMMAS = (2.0, 1.0, 0.5, 0.1, 0.01, 0.005)
#: at most this many held-out cells of each side enter the validation MMD (the first ones of a seeded shuffle)
MAX_VAL_CELLS = 2000
LEAK = 0.2  # LeakyReLU slope of the reference ICNN (``nn.LeakyReLU(0.2)`` in ``ICNN.forward``)
#: a transported latent farther from the origin than FAR times every training latent draws a warning
FAR = 2.0


@dataclass
class TransportHistory:
    """The transport phase of a fit: one entry per evaluation round (every ``ot_eval_every`` f-steps)."""

    #: f-steps done at each round
    steps: list[int] = field(default_factory=list)
    #: mean over perturbations of the last g-step's loss ``f(T(x)) - <x, T(x)>`` (penalty excluded)
    g_loss: list[float] = field(default_factory=list)
    #: mean over perturbations of the last f-step's loss ``f(y) - f(T(x))``
    f_loss: list[float] = field(default_factory=list)
    #: mean over perturbations (with held-out cells) of the validation MMD of ``T(x_val)`` and ``y_val``
    #: (None where no perturbation has held-out cells)
    val_mmd: list[float | None] = field(default_factory=list)
    #: rounds run (the callback's ``epoch``)
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class CellOT(VAEModel):
    """CellOT: an autoencoder, then per perturbation a neural OT map (an ICNN's gradient) in its latent space.

    Besides the autoencoder's parameters, which are those of the VAE module and training loop it shares with
    scGen (``n_hidden`` ... ``precision``; defaults after the reference's autoencoder: 2 x 512 ReLU units, 50
    latent dimensions, no dropout or batch norm, a linear output, Adam lr 1e-3, weight decay 1e-5, batch 64;
    ``DEFAULTS``, docs/cellot.md):

    Parameters
    ----------
    source_contexts
        ``"paired"`` (default): each perturbation's map learns from the control cells of the training contexts
        that also hold cells of that perturbation (the same populations on both sides, as in the reference's
        out-of-sample splits, where the held-out sample is absent from both); ``"all"``: from every training
        control cell (the held-out context's too).
    ot_hidden, ot_layers
        width and number of hidden layers of ``f`` and ``g`` (reference: 4 x 64).
    ot_iters
        f-steps (the reference's ``n_iters``, 100,000; default 1,000).
    n_inner_iters
        g-steps per f-step (reference 10).
    ot_batch_size
        cells of each side per step (default 64, the reference's for the lupus PBMCs of Kang et al.; 256 for
        sci-Plex and its other data).
    ot_lr, ot_beta1, ot_beta2
        Adam of ``f`` and ``g`` (reference 1e-4, 0.5, 0.9; default lr 1e-3).
    g_penalty
        weight of ``sum_l ||relu(-W_l)||_F`` on ``g``'s z-path weights (reference ``g.fnorm_penalty = 1``);
        ``f``'s z-path weights are clamped at 0 after every f-step, as in the reference.
    ot_init_scale
        weights start uniform in ``[0, ot_init_scale]``, biases at 0 (reference ``uniform, b=0.1``).
    ot_eval_every, ot_val_fraction
        every ``ot_eval_every`` f-steps the MMD of the transported held-out control latents to the held-out
        perturbed latents is computed (``ot_val_fraction`` of each side, at most 2000 cells); the weights with
        the lowest MMD are kept (the reference's ``minmmd`` checkpoint). ``ot_val_fraction=0`` keeps the last.

    Notes
    -----
    ``callback(epoch, history)`` of :meth:`fit` is called after every validation round of the transport phase
    (``epoch`` counts rounds from 1; ``history`` is the :class:`TransportHistory`), with :meth:`predict` using
    the current weights; returning True stops training (the best weights so far are kept). The autoencoder
    phase calls no callback: before a map is trained there is no prediction to score.

    One fit learns one map per perturbation seen in training; an unseen combination cannot be predicted
    (``COMBINES`` is False): a map of ``A`` and one of ``B`` do not compose into one of ``A+B``.
    """

    name = "cellot"
    COST = 4.0
    COMBINES = False
    SEARCH_SPACE = {
        "n_latent": {"type": "categorical", "choices": [10, 25, 50, 100]},
        "n_hidden": {"type": "categorical", "choices": [128, 256, 512, 800]},
        "epochs": {"type": "int", "low": 10, "high": 100, "step": 10},
        "ot_hidden": {"type": "categorical", "choices": [32, 64, 128]},
        "ot_layers": {"type": "int", "low": 2, "high": 4},
        "ot_lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "ot_batch_size": {"type": "categorical", "choices": [64, 128, 256, 512]},
        "ot_iters": {"type": "int", "low": 500, "high": 5000, "step": 500},
    }
    DEFAULTS = dict(
        n_hidden=512, n_latent=50, n_layers=2, dropout_rate=0.0, batch_norm=False, activation="relu",
        output_activation=None, kl_weight=5e-5, recon_scale=0.5, kl_scale=0.5, input_noise=0.0,
        epochs=100, batch_size=64, lr=1e-3, weight_decay=1e-5, adam_eps=1e-8, val_fraction=0.1, patience=25,
        min_delta=0.0, restore_best=True, grad_clip=None, precision="float32",
        source_contexts="paired", ot_hidden=64, ot_layers=4, ot_iters=1000, n_inner_iters=10, ot_batch_size=64,
        ot_lr=1e-3, ot_beta1=0.5, ot_beta2=0.9, g_penalty=1.0, ot_init_scale=0.1, ot_eval_every=100,
        ot_val_fraction=0.1,
    )

    def __init__(self, **params: Any):
        super().__init__(**params)
        _validate(self.params)
        #: the stacked parameters of the g networks, one slice per learned perturbation (``self.trained`` order)
        self._g: dict[str, Any] | None = None
        self.transport_history: TransportHistory | None = None
        self._seed: int | None = None
        #: the largest norm of a training latent (a transported latent beyond FAR times it is reported)
        self._radius: float | None = None

    # ------------------------------------------------------------------------------------------ fit
    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool, callback=None) -> None:
        import torch

        from ._train import Rows, train_vae

        self._seed = int(seed)
        X = Rows(adata.X)
        cond = adata.obs[spec.condition_key].astype(str).to_numpy()
        ctx = adata.obs[spec.context_key].astype(str).to_numpy()
        self.module = self._new_module(X.shape[1], seed)
        self.history = train_vae(self.module, X, self._train_config(), seed=seed, progress=progress,
                                 desc="cellot autoencoder", execution=self.execution)
        z = self._encode(X)
        report = self._fit_transport(z, cond, ctx, spec, seed=seed, progress=progress, callback=callback)
        self.fit_info = {"history": self.history.to_dict(), "seed": seed, "steps": self.history.steps,
                         "torch_threads": torch.get_num_threads(), "latent": "posterior mean", "transport": report,
                         **self._device_info(), "warnings": training_warnings(self.name, self.history)}

    def _fit_transport(self, z: np.ndarray, cond: np.ndarray, ctx: np.ndarray, spec: PerturbSpec, *, seed: int,
                       progress: bool, callback=None) -> dict:
        """Train one (f, g) pair of ICNNs per learned perturbation, all in lockstep (see :func:`train_pairs`)."""
        p = self.params
        is_control = cond == spec.control
        if not is_control.any():
            raise InputError(f"cellot: the training cells hold no control cells ({spec.control!r}); there is "
                             "nothing to transport.", params=("control",))
        sources, targets, contexts = [], [], {}
        for label in self.trained:
            if p["source_contexts"] == "paired":
                shared = np.intersect1d(np.unique(ctx[is_control]), np.unique(ctx[cond == label]))
                if len(shared) == 0:
                    raise InputError(
                        f"cellot: perturbation {label!r} shares no context with control cells in the training "
                        f"data, so source_contexts='paired' has no control cells to learn its map from; train "
                        f"with control cells ({spec.control!r}) of its contexts, or use source_contexts='all'.",
                        params=("source_contexts", "perturbed"))
                rows = np.flatnonzero(is_control & np.isin(ctx, shared))
                contexts[label] = shared.tolist()
            else:
                rows = np.flatnonzero(is_control)
                contexts[label] = sorted(np.unique(ctx[is_control]).tolist())
            sources.append(rows)
            targets.append(np.flatnonzero(cond == label))
        hist = TransportHistory()
        self.transport_history = hist
        self._radius = float(np.linalg.norm(z, axis=1).max()) if len(z) else None

        def on_round(epoch, g):  # the model predicts with the current g inside the callback
            self._g = g
            return callback(epoch, hist)

        self._g, per = train_pairs(
            z, sources, targets, hidden=p["ot_hidden"], layers=p["ot_layers"], iters=p["ot_iters"],
            inner=p["n_inner_iters"], batch_size=p["ot_batch_size"], lr=p["ot_lr"],
            betas=(p["ot_beta1"], p["ot_beta2"]), g_penalty=p["g_penalty"], init_scale=p["ot_init_scale"],
            eval_every=p["ot_eval_every"], val_fraction=p["ot_val_fraction"], seed=seed, progress=progress,
            history=hist, callback=None if callback is None else on_round, execution=self.execution)
        for label, info in zip(self.trained, per):
            info["contexts"] = contexts[label]
        return {
            "method": "minimax dual of W2 with ICNNs f, g (Makkuva et al. 2020), map T = grad g",
            "source_contexts": p["source_contexts"],
            "networks": {"hidden": [p["ot_hidden"]] * p["ot_layers"], "activation": f"leaky_relu({LEAK})",
                         "f_constraint": "z-path weights clamped at 0 after every f-step",
                         "g_constraint": f"penalty {p['g_penalty']} * sum ||relu(-W)||_F"},
            "history": hist.to_dict(),
            "perturbations": dict(zip(self.trained, per)),
        }

    # --------------------------------------------------------------------------------------- predict
    def _transfer(self, z: np.ndarray, perturbation: str) -> np.ndarray:
        """``grad g(z)``: the latents of ``z`` transported by the map of ``perturbation``."""
        out = transport(_slice(self._g, self.trained.index(perturbation)), z)
        if self._radius and len(out):
            far = int((np.linalg.norm(out, axis=1) > FAR * self._radius).sum())
            if far:
                warnings.warn(
                    f"cellot: {far} of {len(out)} cells transported by the map of {perturbation!r} land more than "
                    f"{FAR:g} times as far from the origin as any training latent; their decoded expression is an "
                    "extrapolation of the autoencoder. The map may be under-trained: raise ot_iters (or lower "
                    "ot_lr).", InputWarning, stacklevel=5)
        return out

    def transport(self, z: np.ndarray, perturbation: str | None = None) -> np.ndarray:
        """The latents ``z`` (cells x n_latent) pushed through the learned map of ``perturbation`` (omit it when
        one was learned)."""
        self._check_fitted()
        return self._transfer(np.asarray(z, dtype=np.float32), self.resolve(perturbation))

    # ----------------------------------------------------------------------------------- persistence
    def _transfer_arrays(self) -> dict[str, np.ndarray]:
        """``g.<name>``: the g networks' parameters stacked in the order of the saved ``perturbations``."""
        return {f"g.{k}": v.detach().cpu().numpy() for k, v in self._g.items()}

    def _load_transfer(self, arrays: dict[str, np.ndarray]) -> None:
        import torch

        dev = self.execution.torch_device
        g = {k[len("g."):]: torch.from_numpy(v.copy()).to(dev) for k, v in arrays.items() if k.startswith("g.")}
        want = _shapes(len(self.trained), self.params["n_latent"], self.params["ot_hidden"],
                       self.params["ot_layers"])
        got = {k: tuple(v.shape) for k, v in g.items()}
        if got != want:
            raise ValueError(f"transport networks {got} do not match the parameters {want}")
        self._g = g

    def _moved(self) -> None:
        """Move the autoencoder and the g networks to the device of ``self.execution``."""
        super()._moved()
        if self._g is not None:
            dev = self.execution.torch_device
            self._g = {k: v.to(dev) for k, v in self._g.items()}

    def _state_json(self) -> dict:
        return {"seed": self._seed, "latent_radius": self._radius,
                "transport": "g networks (the map is grad g); f is not needed to predict"}

    def _load_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        self._seed = state.get("seed")
        self._radius = state.get("latent_radius")
        super()._load_state(state, arrays)


# --------------------------------------------------------------------------------------------- ICNNs


def _shapes(n: int, d: int, hidden: int, layers: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of ``n`` stacked ICNNs on ``d`` inputs with ``layers`` hidden layers of ``hidden``."""
    units = [hidden] * layers + [1]
    shapes = {}
    for i, h in enumerate(units):
        shapes[f"A{i}"] = (n, d, h)
        shapes[f"b{i}"] = (n, 1, h)
    for i in range(1, len(units)):
        shapes[f"W{i}"] = (n, units[i - 1], units[i])
    return shapes


def init_icnns(n: int, d: int, hidden: int, layers: int, scale: float, generator) -> dict[str, Any]:
    """``n`` ICNNs as stacked tensors: weights uniform in ``[0, scale]``, biases 0 (the reference's init)."""
    import torch

    out = {}
    for name, shape in _shapes(n, d, hidden, layers).items():
        if name.startswith("b"):
            out[name] = torch.zeros(shape)
        else:
            out[name] = torch.rand(shape, generator=generator) * scale
    return out


def icnn(params: dict[str, Any], x):
    """The stacked ICNNs at ``x`` (n x cells x d) -> (n x cells x 1).

    ``z_1 = leaky_relu(A_0 x + b_0)^2``; ``z_{l+1} = leaky_relu(W_l z_l + A_l x + b_l)``; output
    ``W_L z_L + A_L x + b_L``: convex in ``x`` where the ``W`` are non-negative (the reference's ``ICNN.forward``).
    """
    import torch
    from torch.nn.functional import leaky_relu

    n_w = sum(1 for k in params if k.startswith("W"))
    z = leaky_relu(torch.baddbmm(params["b0"], x, params["A0"]), LEAK)
    z = z * z
    for i in range(1, n_w):
        z = leaky_relu(torch.baddbmm(params[f"b{i}"], x, params[f"A{i}"]) + torch.bmm(z, params[f"W{i}"]), LEAK)
    return torch.baddbmm(params[f"b{n_w}"], x, params[f"A{n_w}"]) + torch.bmm(z, params[f"W{n_w}"])


def grad_map(params: dict[str, Any], x):
    """``grad_x`` of each stacked ICNN at ``x`` (n x cells x d): the transport of every network's cells.

    The chain rule of :func:`icnn` written out, so the map is an ordinary differentiable function of the weights
    and of ``x``; its values are those of ``torch.autograd.grad`` of the potential, and training through it
    (one backward pass) is about 1.7 times faster than through autograd's double backward.
    """
    import torch
    from torch.nn.functional import leaky_relu

    n_w = sum(1 for k in params if k.startswith("W"))
    u0 = torch.baddbmm(params["b0"], x, params["A0"])
    a0 = leaky_relu(u0, LEAK)
    z = a0 * a0
    pre = []
    for i in range(1, n_w):
        u = torch.baddbmm(params[f"b{i}"], x, params[f"A{i}"]) + torch.bmm(z, params[f"W{i}"])
        pre.append(u)
        z = leaky_relu(u, LEAK)
    shape = (x.shape[0], x.shape[1], -1)
    dz = params[f"W{n_w}"].transpose(1, 2).expand(shape)  # d output / d z_L
    gx = params[f"A{n_w}"].transpose(1, 2).expand(shape)  # d output / d x through A_L
    for i in range(n_w - 1, 0, -1):
        du = dz * _slope(pre[i - 1])
        gx = torch.baddbmm(gx, du, params[f"A{i}"].transpose(1, 2))
        dz = torch.bmm(du, params[f"W{i}"].transpose(1, 2))
    du0 = dz * (2 * a0) * _slope(u0)
    return torch.baddbmm(gx, du0, params["A0"].transpose(1, 2))


def _slope(u):
    """The derivative of ``leaky_relu(u, LEAK)`` (1 where u > 0, else LEAK, as autograd's)."""
    return (u > 0).to(u.dtype) * (1.0 - LEAK) + LEAK


def transport(g: dict[str, Any], z: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``grad g(z)`` for one g network (a slice of stacked parameters) and latents ``z`` (cells x d), chunk by
    chunk on the device of ``g``'s tensors (each chunk's result moved to the CPU once)."""
    import torch

    dev = next(iter(g.values())).device
    zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    with torch.no_grad():
        parts = [grad_map(g, zt[i:i + chunk].to(dev)[None])[0].cpu().numpy() for i in range(0, len(zt), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, zt.shape[1]), dtype=np.float32)


def _slice(params: dict[str, Any], k: int) -> dict[str, Any]:
    return {name: v[k:k + 1] for name, v in params.items()}


def _mmd_terms(a, b, gammas=MMD_GAMMAS):
    """Mean RBF kernel values ``E k(a, b)`` for each gamma (one pairwise distance matrix)."""
    import torch

    from ._train import wide_float

    wide = wide_float(a.device)
    d2 = torch.cdist(a.to(wide), b.to(wide)).pow(2)
    return [float(v) for v in torch.stack([torch.exp(-g * d2).mean() for g in gammas]).cpu()]


def train_pairs(z: np.ndarray, sources: list[np.ndarray], targets: list[np.ndarray], *, hidden: int, layers: int,
                iters: int, inner: int, batch_size: int, lr: float, betas: tuple[float, float], g_penalty: float,
                init_scale: float, eval_every: int, val_fraction: float, seed: int, progress: bool = False,
                history: TransportHistory | None = None, callback=None, execution=None):
    """Train one (f, g) ICNN pair per problem ``k``: transport the latents ``z[sources[k]]`` onto ``z[targets[k]]``.

    All pairs are stacked and trained in lockstep: every parameter belongs to one problem and the loss is the sum
    of the problems' losses, so each pair's Adam updates are those it would get alone. One f-step: ``inner``
    g-steps, each on a fresh batch of source cells minimising ``mean(f(T(x)) - <x, T(x)>) + g_penalty *
    sum_l ||relu(-W_l^g)||_F``, then one f-step on fresh source cells and one batch of target cells minimising
    ``mean(f(y) - f(T(x)))``, then ``f``'s z-path weights clamped at 0 (the reference's ``train_cellot``).

    Batches are drawn with replacement from each problem's training cells by a ``torch.Generator`` seeded from
    ``seed`` (the caller's RNG is untouched). Returns the g networks (stacked; the best validation round's
    weights of each problem where it has held-out cells, else the last) and one report dict per problem.

    ``execution`` (None: the CPU): the networks train on its device. The validation split and the initial
    weights come from the CPU generator on every device (the same as on the CPU); off the CPU the batches are
    drawn by a generator on the device (seeded from ``seed``), the losses stay there and a non-finite loss is
    detected at the next evaluation round instead of at its step (no per-step synchronisation).
    """
    import torch

    from ..execution import check as _execution

    ex = _execution(execution)
    dev = ex.torch_device
    on_cpu = ex.kind == "cpu"
    t0 = time.perf_counter()
    hist = history if history is not None else TransportHistory()
    n, d = len(sources), z.shape[1]
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0xCE11]).generate_state(1)[0]))
    bgen = gen if on_cpu else torch.Generator(device=dev).manual_seed(
        int(np.random.SeedSequence([seed, 0xCE11, 1]).generate_state(1)[0]))
    Z = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(dev)

    # held-out cells of each side of each problem (a seeded shuffle; none where a side has under 20 cells)
    train_src, train_tgt, val = [], [], []
    for src, tgt in zip(sources, targets):
        parts = []
        for rows in (src, tgt):
            perm = rows[torch.randperm(len(rows), generator=gen).numpy()]
            n_val = min(round(len(rows) * val_fraction), MAX_VAL_CELLS) \
                if val_fraction > 0 and len(src) >= 20 and len(tgt) >= 20 else 0
            parts.append((perm[n_val:], perm[:n_val]))
        (s_tr, s_val), (t_tr, t_val) = parts
        train_src.append(np.sort(s_tr))
        train_tgt.append(np.sort(t_tr))
        val.append((s_val, t_val) if len(s_val) and len(t_val) else None)

    def padded(rows_list):
        width = max(len(r) for r in rows_list)
        idx = torch.zeros((n, width), dtype=torch.long)
        for k, rows in enumerate(rows_list):
            idx[k, :len(rows)] = torch.from_numpy(rows.astype(np.int64))
        return idx, torch.tensor([len(r) for r in rows_list], dtype=torch.long)

    src_idx, n_src = (t.to(dev) for t in padded(train_src))
    tgt_idx, n_tgt = (t.to(dev) for t in padded(train_tgt))

    def batch(idx, counts):
        pick = (torch.rand((n, batch_size), generator=bgen, device=dev) * counts[:, None]).long()
        pick = torch.minimum(pick, counts[:, None] - 1)
        return Z[idx.gather(1, pick)]  # n x batch x d

    f = {k: v.to(dev).requires_grad_(True) for k, v in init_icnns(n, d, hidden, layers, init_scale, gen).items()}
    g = {k: v.to(dev).requires_grad_(True) for k, v in init_icnns(n, d, hidden, layers, init_scale, gen).items()}
    opt_f, opt_g = _adam(list(f.values()), lr, betas), _adam(list(g.values()), lr, betas)
    w_f = [v for k, v in f.items() if k.startswith("W")]
    w_g = [v for k, v in g.items() if k.startswith("W")]

    # validation: the target side's kernel means are fixed
    val_t = [None if v is None else Z[torch.from_numpy(v[1].astype(np.int64)).to(dev)] for v in val]
    val_s = [None if v is None else Z[torch.from_numpy(v[0].astype(np.int64)).to(dev)] for v in val]
    yy = [None if t is None else _mmd_terms(t, t) for t in val_t]
    best = [math.inf] * n
    best_step = [0] * n
    best_g = {k: v.detach().clone() for k, v in g.items()}
    mmd_rounds: list[list[float]] = [[] for _ in range(n)]

    def evaluate(step: int) -> None:
        gd = {k: v.detach() for k, v in g.items()}
        for k in range(n):
            if val_s[k] is None:
                continue
            with torch.no_grad():
                tx = grad_map(_slice(gd, k), val_s[k][None])[0]
            value = float(np.mean([a + b - 2 * c for a, b, c in zip(_mmd_terms(tx, tx), yy[k],
                                                                      _mmd_terms(tx, val_t[k]))]))
            mmd_rounds[k].append(value)
            if value < best[k]:  # NaN never improves
                best[k], best_step[k] = value, step
                for name, v in gd.items():
                    best_g[name][k] = v[k]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iters, desc="cellot transport", unit="step", leave=False, dynamic_ncols=True)
    gl = fl = torch.zeros(n, device=dev)
    first_bad = None if on_cpu else torch.zeros((), dtype=torch.long, device=dev)  # step of a non-finite loss
    for step in range(1, iters + 1):
        y = batch(tgt_idx, n_tgt)
        f_fixed = {k: v.detach() for k, v in f.items()}  # the g-steps need no gradient of f's weights
        for _ in range(inner):
            x = batch(src_idx, n_src)
            tx = grad_map(g, x)
            per = (icnn(f_fixed, tx) - (x * tx).sum(-1, keepdim=True)).mean(dim=(1, 2))
            loss = per.sum()
            if g_penalty > 0:
                loss = loss + g_penalty * sum(torch.linalg.vector_norm(torch.relu(-w), dim=(1, 2)).sum()
                                              for w in w_g)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            gl = per.detach()
        with torch.no_grad():
            tx = grad_map(g, batch(src_idx, n_src))
        per_f = (icnn(f, y) - icnn(f, tx)).mean(dim=(1, 2))
        opt_f.zero_grad(set_to_none=True)
        per_f.sum().backward()
        opt_f.step()
        with torch.no_grad():
            for w in w_f:
                w.clamp_(min=0)
        fl = per_f.detach()
        if on_cpu:
            if not (torch.isfinite(gl).all() and torch.isfinite(fl).all()):
                _not_finite(gl, fl, step)
        else:  # no synchronisation per step: the first bad step is kept on the device, read at the round
            finite = torch.isfinite(gl).all() & torch.isfinite(fl).all()
            first_bad = torch.where((first_bad == 0) & ~finite, step, first_bad)
        if bar is not None:
            bar.update(1)
        if step % eval_every == 0 or step == iters:
            if first_bad is not None and int(first_bad):
                _not_finite(gl, fl, int(first_bad))
            evaluate(step)
            hist.steps.append(step)
            hist.g_loss.append(float(gl.mean()))
            hist.f_loss.append(float(fl.mean()))
            last = [m[-1] for m in mmd_rounds if m]
            hist.val_mmd.append(float(np.mean(last)) if last else None)
            hist.epochs_run += 1
            if bar is not None:
                mmd = hist.val_mmd[-1]
                bar.set_postfix(g=f"{hist.g_loss[-1]:.3f}", f=f"{hist.f_loss[-1]:.3f}",
                                mmd="-" if mmd is None else f"{mmd:.4f}")
            if callback is not None:
                with torch.random.fork_rng(devices=ex.fork_devices()):
                    stop = callback(hist.epochs_run, {k: v.detach() for k, v in g.items()})
                if stop:
                    hist.stopped_early = True
                    break
    if bar is not None:
        bar.close()
    final = {k: v.detach().clone() for k, v in g.items()}
    for k in range(n):
        if val_s[k] is not None and best_step[k] > 0:
            for name, v in final.items():
                v[k] = best_g[name][k]
    hist.seconds = time.perf_counter() - t0
    reports = []
    for k in range(n):
        selected = val_s[k] is not None and best_step[k] > 0
        reports.append({
            "n_source": len(sources[k]), "n_target": len(targets[k]),
            "n_val_source": 0 if val_s[k] is None else len(val_s[k]),
            "n_val_target": 0 if val_t[k] is None else len(val_t[k]),
            "final_g_loss": float(gl[k]), "final_f_loss": float(fl[k]),
            "val_mmd": mmd_rounds[k],
            "selected_step": best_step[k] if selected else hist.steps[-1] if hist.steps else 0,
            "selected_by": "lowest validation MMD" if selected else "last step (no held-out cells)",
        })
    return final, reports


def _not_finite(gl, fl, step: int):
    bad = [k for k in range(len(gl)) if not (math.isfinite(float(gl[k])) and math.isfinite(float(fl[k])))]
    raise FloatingPointError(f"cellot: the transport loss of problem(s) {bad[:5]} is not finite at step "
                             f"{step}; lower ot_lr or ot_init_scale.")


def _adam(params: list, lr: float, betas: tuple[float, float]):
    """Adam (no weight decay, as the reference) with the fused CPU kernel where torch has it (>= 2.4)."""
    import torch

    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas)


# ------------------------------------------------------------------------------------------- checks


def _validate(p: dict) -> None:
    def bad(key, fix):
        raise InputError(f"cellot: parameter {key!r} {fix}, got {p[key]!r}.", params=(key,))

    def integer(key):
        return isinstance(p[key], (int, np.integer)) and not isinstance(p[key], bool)

    def number(key):
        return isinstance(p[key], (int, float, np.integer, np.floating)) and not isinstance(p[key], bool) \
            and math.isfinite(p[key])

    if p["source_contexts"] not in SOURCE_CONTEXTS:
        bad("source_contexts", "must be 'paired' (control cells of the contexts seen with the perturbation, "
            "default) or 'all' (every training control cell)")
    if p["output_activation"] not in (None, "relu"):
        bad("output_activation", "must be None (linear output, the reference autoencoder) or 'relu'")
    for key in ("ot_hidden", "ot_layers", "ot_iters", "n_inner_iters", "ot_eval_every"):
        if not integer(key) or p[key] < 1:
            bad(key, "must be an integer >= 1")
    if not integer("ot_batch_size") or p["ot_batch_size"] < 2:
        bad("ot_batch_size", "must be an integer >= 2")
    for key in ("ot_lr", "ot_init_scale"):
        if not number(key) or p[key] <= 0:
            bad(key, "must be a number > 0")
    for key in ("ot_beta1", "ot_beta2"):
        if not number(key) or not 0 <= p[key] < 1:
            bad(key, "must be in [0, 1) (Adam's beta)")
    if not number("g_penalty") or p["g_penalty"] < 0:
        bad("g_penalty", "must be a number >= 0")
    if not number("ot_val_fraction") or not 0 <= p["ot_val_fraction"] < 1:
        bad("ot_val_fraction", "must be in [0, 1)")
