"""scPRAM (Jiang et al., Bioinformatics 2024): optimal-transport pairing + per-cell attention in a VAE latent space.

The method, as published:

1. a VAE maps cells to a latent space (the same module and training loop as scGen, other settings);
2. optimal transport pairs the training control cells with the training perturbed cells in latent space, giving
   one delta vector per control cell (``z_paired_perturbed - z_control``);
3. every query (source) cell attends to the training control cells: cosine similarity of the latents, keep the
   top ``ratio`` share, weights proportional to the similarities; its delta is the weighted sum of the paired
   deltas;
4. decode ``z_query + delta_query``.

Defaults follow the reference package (``scpram`` 0.0.3, ``scpram/models.py``): 1000 hidden units, 100 latent
dimensions, two ReLU layers without batch norm or dropout on each side, a ReLU on the output, input noise 0.1
while training, loss per cell ``0.5 * sum_g (x - x_hat)^2 + 0.5 * 5e-4 * KL`` averaged over the batch, Adam
(lr 5e-4, weight decay 1e-5, eps 1e-8), batch 128, 100 epochs on every training cell (no validation split, no
early stopping, the last weights kept), gradients clipped to a global norm of 10.

Differences from the package, on purpose (see docs/scpram.md):

- Training stops early, as scGen's: 10 % of the training cells are a validation split, training stops after 25
  epochs without a better validation loss, and the best weights are kept (docs/training.md).
  ``early_stopping=False`` trains as the package does: every training cell, all epochs, the last weights.

- Attention is computed for every query cell. The package's ``predict`` keeps the neighbours and weights of the
  *first* query cell only and adds that one delta to every cell; ``attention="first_cell"`` reproduces it.
- Pairing uses entropic optimal transport (POT's Sinkhorn) with a documented regularisation and a convergence
  check. The package calls exact EMD with ``numItermax=100000``, which stops before optimality on Kang (POT
  warns "numItermax reached"); ``ot="exact"`` runs EMD with a far larger limit and reports POT's result code.
- The cost is the squared Euclidean distance (the usual OT cost); the package uses the Euclidean distance
  (``ot_cost="euclidean"`` reproduces it).
- Latents are posterior means for pairing and for the queries; the package encodes with one random draw from
  the posterior (``latent_sampling=True`` does that, with draws seeded by the fit seed).
- ``ot_within_context=True`` (not the default) pairs each context's control cells with the same context's
  perturbed cells only; by default, as in the package, one OT spans every paired context and pairs some
  control cells with perturbed cells of another context (measured in docs/scpram.md).
- ``precision="auto"`` (default) trains with bfloat16 autocast on CPUs with native bfloat16 instructions
  (AMX-BF16 / AVX512-BF16; weights, gradients and Adam state stay float32) and in float32 elsewhere; the
  precision used is recorded. ``precision="float32"`` is the reference arithmetic. See docs/scpram.md.

As in the package, only contexts (cell types) seen in both conditions in the training data take part in the
pairing and serve as attention keys: the held-out cell type's control cells have no perturbed counterpart.

Screens (several perturbations): one VAE is fitted on every training cell; then each perturbation ``p`` gets
its own pairing (steps 2 and 3 above) of the control cells of the contexts that have both control and ``p``
cells with ``p``'s cells, and ``p`` is predicted from its own attention-weighted deltas. An unseen combination
``A+B`` is predicted as ``z + delta_A(z) + delta_B(z)``, each single's attention-weighted delta for the same
query cell: the latent-arithmetic extension (as scGen's), not part of the published method.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from ..data import PerturbSpec
from ..errors import InputError
from ._ot import (  # noqa: F401  (the OT helpers live in _ot; their names stay importable from here)
    DENSE_MAX_GB,
    EMD_MAX_ITER,
    OT_COSTS,
    OT_METHODS,
    SINKHORN_MAX_ITER,
    cost_matrix,
    cost_matrix_torch,
    ot_pairing,
    ot_pairing_tiled,
    ot_pairing_torch,
)
from ._vaemodel import VAEModel

ATTENTION = ("cell", "first_cell")


class Pairing(NamedTuple):
    """One perturbation's pairing: its training control cells and the delta each was paired with."""

    #: latents of the training control cells of the contexts seen with the perturbation (training order)
    control_latent: np.ndarray
    #: ``z_paired_perturbed - z_control`` of each of those control cells
    paired_delta: np.ndarray
    #: the context of each of those control cells
    control_context: np.ndarray | None


class ScPRAM(VAEModel):
    """scPRAM: a VAE whose latent transfer is OT-paired deltas averaged by per-cell cosine attention.

    Besides the VAE and training parameters it shares with scGen (``DEFAULTS``, docs/scpram.md):

    Parameters
    ----------
    ratio
        share of the training control cells each query attends to: the top ``ceil(ratio * n_control)`` by
        cosine similarity (reference default 0.05; the package's PBMC tutorial uses 0.005).
    ot
        ``"sinkhorn"`` (entropic OT, default) or ``"exact"`` (network simplex EMD).
    ot_reg
        Sinkhorn's entropic regularisation, relative to the cost scale: the cost matrix is divided by its median
        before POT is called, so ``ot_reg=0.05`` means an entropic blur of 5 % of the median pair cost.
    ot_max_iter
        iteration limit (None: 1000 Sinkhorn iterations, 10,000,000 simplex iterations for ``"exact"``).
    ot_tol
        Sinkhorn stops when the L1 distance of the plan's perturbed-side marginal to uniform is below ``ot_tol``;
        the solve counts as converged when both marginals are within ``ot_tol`` (L1) of uniform.
    ot_cost
        ``"sqeuclidean"`` (default) or ``"euclidean"`` (the package's ``ot.dist(metric="euclidean")``).
    ot_dense_max_gb
        the largest float64 cost matrix (GiB, ``8 * n_control * n_perturbed`` bytes) whose Sinkhorn plan is
        solved densely (default 0.25: ~5,790 x 5,790 cells; Kang's training cells take ~0.13). Above it the
        pairing runs in bounded memory: Sinkhorn potentials on a seeded subsample whose cost matrix fits this
        size, each control cell's partner by a tiled c-transform over the perturbed cells (docs/scpram.md, "OT
        at scale"). ``ot="exact"`` is always dense; a dense plan that cannot fit the available memory stops
        with an InputError before allocating.
    ot_max_candidates
        above ``ot_dense_max_gb``: search each control cell's partner among a seeded subsample of at most this
        many perturbed cells (None, default: all of them); the pairing's time is then linear in the cells.
    attention
        ``"cell"`` (published: each query cell its own neighbours and weights) or ``"first_cell"`` (the package's
        ``predict``: the first query cell's neighbours and weights used for every cell).
    attention_max_keys
        None (default): each query attends among every training control cell of the pairing, so the prediction
        takes ``n_query x n_control`` similarities (quadratic in the cells). An integer: among a seeded
        subsample of at most this many of them (drawn once per perturbation from the fit seed; the top
        ``ceil(ratio * max_keys)``), linear in the cells (docs/scpram.md, "OT at scale").
    latent_sampling
        False: posterior means for pairing and queries (default). True: one posterior draw per cell, seeded by
        the fit seed (the package draws unseeded).
    ot_within_context
        False (default, as the package): one OT over the control and perturbed cells of every paired context.
        True: one OT per context, so that a control cell's partner is always a perturbed cell of its own
        context (:func:`pair_within_contexts`). The paper leaves this open; docs/scpram.md measures both on
        validation tasks and says why the default stays.

    Several perturbations (a screen): one VAE, then one OT pairing and attention per perturbation (each over
    the control cells of the contexts seen with it; :meth:`pairing`). An unseen combination ``A+B`` adds the
    singles' attention-weighted deltas for the same query cell, ``z + delta_A(z) + delta_B(z)``: a
    latent-arithmetic extension, not part of the published method.
    """

    name = "scpram"
    COST = 2.0
    COMBINES = True
    PREDICT_PARAMS = ("ratio", "attention", "attention_max_keys")
    OPTIONS = {
        "ratio": (float, "share of control cells attended to"),
        "ot": (str, "optimal transport, sinkhorn or exact"),
        "attention": (str, "cell (published) or first_cell (pip package)"),
    }
    SEARCH_SPACE = {
        **{k: v for k, v in VAEModel.SEARCH_SPACE.items() if k not in ("lr", "kl_weight", "batch_size", "epochs")},
        "n_hidden": {"type": "categorical", "choices": [128, 256, 512, 1000]},
        "ratio": {"type": "float", "low": 0.005, "high": 0.2, "log": True},
        **{k: VAEModel.SEARCH_SPACE[k] for k in ("lr", "kl_weight", "batch_size", "epochs")},
    }
    DEFAULTS = dict(
        n_hidden=1000, n_latent=100, n_layers=2, dropout_rate=0.0, batch_norm=False, activation="relu",
        output_activation="relu", kl_weight=5e-4, recon_scale=0.5, kl_scale=0.5, input_noise=0.1,
        epochs=100, max_steps=None, batch_size=128, lr=5e-4, weight_decay=1e-5, adam_eps=1e-8,
        early_stopping=True, val_fraction=0.1, patience=25, min_delta=0.0, restore_best=True, grad_clip=10.0,
        precision="auto",
        ratio=0.05, ot="sinkhorn", ot_reg=0.05, ot_max_iter=None, ot_tol=1e-3, ot_cost="sqeuclidean",
        attention="cell", latent_sampling=False, ot_within_context=False,
        ot_dense_max_gb=DENSE_MAX_GB, ot_max_candidates=None, attention_max_keys=None,
    )

    def __init__(self, **params: Any):
        super().__init__(**params)
        _validate(self.params)
        #: latents and contexts of the training control cells that take part in a pairing (training order)
        self._controls: np.ndarray | None = None
        self._controls_context: np.ndarray | None = None
        #: perturbation -> (rows of its control cells in ``_controls``, their paired deltas)
        self._pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._seed: int | None = None
        self._rng = None  # a torch.Generator while encoding with latent_sampling=True

    # ------------------------------------------------------------------------------------------ fit
    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool, callback=None) -> None:
        import torch

        self._seed = int(seed)
        self._rng = self._generator(0) if self.params["latent_sampling"] else None
        try:
            super()._fit(adata, spec, seed=seed, progress=progress, callback=callback)
        finally:
            self._rng = None
        self.fit_info.update(self._fit_extra)
        if self.params["latent_sampling"]:
            self.fit_info["latent"] = f"one posterior draw per cell (torch.Generator seeded from seed {seed})"
        self.fit_info["torch_threads"] = torch.get_num_threads()

    def _fit_transfer(self, z: np.ndarray, cond: np.ndarray, ctx: np.ndarray, spec: PerturbSpec, *,
                      seed: int) -> None:
        """For each learned perturbation, pair its training control cells with its perturbed cells by OT; keep
        their latent deltas.

        Only contexts with cells of both the control and the perturbation take part. Each control cell's
        partner is the perturbed cell holding the largest share of its row of the transport plan (the
        package's ``torch.max(G, 0)``). We keep this argmax rather than the barycentric projection
        ``n_control * P @ z_perturbed``: the paper pairs a control cell with a perturbed *cell*, and under
        entropic OT the projection is a blurred average over many perturbed cells (it shrinks every delta
        towards the mean delta by an amount set by ``ot_reg``), whereas the argmax stays a real perturbed cell
        and is the same under exact OT and under a sharp enough plan.
        """
        p = self.params
        if not self.trained:
            raise InputError(f"scpram: no requested perturbation (perturbed={spec.to_dict()['perturbed']!r}) "
                             "has cells in the training data; nothing to learn.", params=("perturbed",))
        is_control = cond == spec.control
        paired = {label: np.intersect1d(np.unique(ctx[is_control]), np.unique(ctx[cond == label]))
                  for label in self.trained}
        lonely = [label for label, contexts in paired.items() if len(contexts) == 0]
        if lonely:
            raise InputError(f"scpram: perturbation(s) {lonely[:5]} share no context with control cells in "
                             "the training data, so no control cell can be paired with them; train with "
                             f"control cells ({spec.control!r}) of their contexts, or leave them out of "
                             "perturbed.", params=("perturbed",))
        keep = is_control & np.isin(ctx, np.unique(np.concatenate(list(paired.values()))))
        self._controls = np.ascontiguousarray(z[keep], dtype=np.float32)
        self._controls_context = ctx[keep].astype(str)
        self._pairs, report = {}, {}
        for label in self.trained:
            use = np.isin(ctx, paired[label])
            rows = np.flatnonzero(use[keep])
            zc = self._controls if len(rows) == len(self._controls) else self._controls[rows]
            pert = use & (cond == label)
            zp = np.ascontiguousarray(z[pert], dtype=np.float32)
            ctx_c, ctx_p = self._controls_context[rows], ctx[pert]

            self._warn_quadratic(zc, zp, label)

            def solve(zc, zp):
                return ot_pairing(zc, zp, method=p["ot"], reg=p["ot_reg"], max_iter=p["ot_max_iter"],
                                  tol=p["ot_tol"], cost=p["ot_cost"], device=self._torch_device(),
                                  dense_max_gb=p["ot_dense_max_gb"], max_candidates=p["ot_max_candidates"],
                                  seed=seed)

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if p["ot_within_context"]:
                    partner, info = pair_within_contexts(solve, zc, zp, ctx_c, ctx_p)
                else:
                    partner, info = solve(zc, zp)
                    info["within_context"] = False
                    info["partner_own_context"] = own_context_shares(partner, ctx_c, ctx_p)
                    _warn_cross_context(info["partner_own_context"], ctx_c, ctx_p)
            for w in caught:  # with several perturbations, a warning names its own
                text = w.message if len(self.trained) == 1 else f"perturbation {label!r}: {w.message}"
                warnings.warn(text, w.category, stacklevel=2)
            self._pairs[label] = (rows, (zp[partner] - zc).astype(np.float32))
            info["distinct_partners"] = int(len(np.unique(partner)))
            report[label] = {
                "ot": info,
                "transfer": {"n_control": int(len(zc)), "n_perturbed": int(len(zp)),
                             "contexts": paired[label].tolist(),
                             "contexts_left_out": sorted(set(np.unique(ctx)) - set(paired[label])),
                             "attention": p["attention"], "ratio": p["ratio"],
                             "n_attended": n_attended(p["ratio"], len(zc)),
                             "ot_within_context": p["ot_within_context"]},
            }
        if len(self.trained) == 1:  # one perturbation: its report at the top level
            self._fit_extra = report[self.trained[0]]
        else:
            self._fit_extra = {
                "pairing": {"n_controls": int(len(self._controls)), "attention": p["attention"],
                            "ratio": p["ratio"],
                            "ot_converged": all(r["ot"]["converged"] for r in report.values()),
                            "combinations": "an unseen A+B adds the singles' attention-weighted deltas "
                                            "(latent arithmetic, not in the paper)"},
                "perturbations": report,
            }

    def _warn_quadratic(self, zc: np.ndarray, zp: np.ndarray, label: str) -> None:
        """Before a pairing whose all-pairs steps will be slow (more than ``QUADRATIC_PAIRS`` pairs, or more than
        ``QUADRATIC_KEYS`` training controls for every predicted cell to attend among): one warning each, naming
        the option that makes the step linear in the cells."""
        p, n, m = self.params, len(zc), len(zp)
        who = "" if len(self.trained) == 1 else f"perturbation {label!r}: "
        if (p["ot"] == "sinkhorn" and not p["ot_within_context"] and p["ot_max_candidates"] is None
                and n * m > QUADRATIC_PAIRS):
            warnings.warn(f"{who}scpram's OT pairing compares each of {n:,} training control cells with each of "
                          f"{m:,} perturbed cells ({n * m:.1e} pairs; its time grows with the square of the "
                          f"cells); ot_max_candidates={SCALE_CAP} makes it linear (docs/scpram.md, 'OT at scale').",
                          UserWarning, stacklevel=4)
        if p["attention"] == "cell" and p["attention_max_keys"] is None and n > QUADRATIC_KEYS:
            warnings.warn(f"{who}scpram's attention will compare every predicted cell with each of {n:,} training "
                          f"control cells (its time grows with the square of the cells); attention_max_keys="
                          f"{SCALE_CAP} makes it linear (docs/scpram.md, 'OT at scale').", UserWarning, stacklevel=4)

    # --------------------------------------------------------------------------------------- predict
    def pairing(self, perturbation: str | None = None) -> Pairing:
        """The training control cells and paired deltas of ``perturbation`` (omit it when one was learned)."""
        rows, delta = self._pairs[self._pair_label(perturbation)]
        every = len(rows) == len(self._controls)
        ctx = self._controls_context
        return Pairing(self._controls if every else self._controls[rows], delta,
                       ctx if ctx is None or every else ctx[rows])

    @property
    def control_latent(self) -> np.ndarray | None:
        """The training control latents of the one learned perturbation (None before fitting; a screen has one
        set per perturbation: :meth:`pairing`)."""
        return self.pairing().control_latent if self._pairs else None

    @property
    def paired_delta(self) -> np.ndarray | None:
        """The paired delta of each of :attr:`control_latent` (one learned perturbation; :meth:`pairing`)."""
        return self.pairing().paired_delta if self._pairs else None

    @property
    def control_context(self) -> np.ndarray | None:
        """The context of each of :attr:`control_latent` (one learned perturbation; see :meth:`pairing`)."""
        return self.pairing().control_context if self._pairs else None

    def _pair_label(self, perturbation: str | None) -> str:
        """The learned perturbation whose pairing is asked for (clear errors for any other)."""
        if perturbation is None and len(self._pairs) == 1:
            return next(iter(self._pairs))
        label = self.resolve(perturbation)
        if label not in self._pairs:
            singles = ", ".join(map(repr, self.spec.singles(label)))
            raise InputError(f"scpram: {label!r} was not in the training data, so it has no pairing or "
                             f"attention of its own; its prediction adds the attention-weighted deltas of "
                             f"{singles}. Ask for one of those.", params=("perturbation",))
        return label

    def attention(self, source, perturbation: str | None = None) -> sp.csr_matrix:
        """Attention weights of the cells of ``source`` over the training control cells of ``perturbation``.

        A sparse (n_source x n_training_control) matrix whose rows sum to 1; column ``j`` is the ``j``-th control
        cell of the contexts paired with the perturbation, in training order
        (``model.pairing(perturbation).control_latent[j]``; ``model.control_latent[j]`` with one).
        ``perturbation`` may be omitted when the model learned one.
        """
        from ._train import Rows

        self._check_fitted()
        label = self._pair_label(perturbation)
        self.check_genes(source, "source")
        return self._weights(self._query_latent(Rows(source.X)), label)

    def figures(self, source) -> dict[str, Any]:
        """``attention``: the tutorial's heatmap of the query cells' attention over the training control cells
        (for a screen, that of the first learned perturbation, named in the title)."""
        from .. import pl

        first = None if len(self.trained) == 1 else self.trained[0]
        return {"attention": pl.attention_heatmap(self, source, perturbation=first)}

    _draws = None  # one generator for every piece while predict_chunks predicts a source in pieces
    _first_delta = None  # attention="first_cell" in pieces: the source's first cell's delta per perturbation

    def predict_chunks(self, source, perturbation: str, chunk: int):
        """As :meth:`Model.predict_chunks`, so that every cell gets what it gets when the source is predicted
        whole: with ``latent_sampling`` the pieces continue one stream of draws; with ``attention="first_cell"``
        every piece takes the delta of the source's first cell (not of its own first cell)."""
        sampled = self.params["latent_sampling"]
        first = self.params["attention"] == "first_cell"
        if not (sampled or first) or source.n_obs <= chunk:
            yield from super().predict_chunks(source, perturbation, chunk)
            return
        self._draws = self._generator(1) if sampled else None
        self._first_delta = {} if first else None
        try:
            yield from super().predict_chunks(source, perturbation, chunk)
        finally:
            self._draws = self._first_delta = None

    def _predict_matrix(self, source, perturbation: str) -> np.ndarray:
        from ._train import Rows

        z = self._query_latent(Rows(source.X))
        return self.decode(self._transfer(z, perturbation))

    def _transfer(self, z: np.ndarray, perturbation: str) -> np.ndarray:
        """``z`` plus the attention-weighted paired deltas of ``perturbation``; for an unseen combination the
        sum of its singles' (each single's own attention for the same query cell)."""
        labels = [perturbation] if perturbation in self._pairs else self.spec.singles(perturbation)
        delta = None
        for label in labels:
            keys, deltas, _ = self._keys(label)
            # the attention rows (query x kept keys, an index and a weight each, their pieces and the sparse
            # matrix made of them: about 48 bytes a kept key) held ATTENTION_BYTES at a time
            step = max(len(z), 1)
            if self.params["attention"] == "cell":
                step = max(1, min(len(z), ATTENTION_BYTES // (48 * n_attended(self.params["ratio"], len(keys)))))
            if self._first_delta is not None:  # first_cell, in pieces: the first piece's first cell for all
                if label not in self._first_delta:
                    self._first_delta[label] = self._attend(z[:1], keys) @ deltas
                d = np.repeat(self._first_delta[label], len(z), axis=0)
            else:
                d = np.concatenate([self._attend(z[i:i + step], keys) @ deltas for i in range(0, len(z), step)])
            delta = d if delta is None else delta + d
        return (z + delta).astype(np.float32)

    def _attend(self, z: np.ndarray, keys: np.ndarray) -> sp.csr_matrix:
        return attention_weights(z, keys, self.params["ratio"], mode=self.params["attention"],
                                 device=self._torch_device())

    def _weights(self, z: np.ndarray, perturbation: str) -> sp.csr_matrix:
        """The attention of the queries ``z`` over every training control of ``perturbation``'s pairing."""
        keys, _, sub = self._keys(perturbation)
        w = self._attend(z, keys)
        if sub is None:
            return w
        out = sp.csr_matrix((w.data, sub[w.indices], w.indptr), shape=(len(z), len(self._pairs[perturbation][0])))
        out.has_sorted_indices = True  # sub is sorted
        return out

    def _keys(self, perturbation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The training controls a query attends among for ``perturbation``, their paired deltas and their
        places among the pairing's controls (None: all of them; else the ``attention_max_keys`` subsample,
        gathered once so that the attention and the weighted sum read contiguous rows)."""
        rows, deltas = self._pairs[perturbation]
        keys = self._controls if len(rows) == len(self._controls) else self._controls[rows]
        sub = self._attended_keys(perturbation, len(keys))
        return (keys, deltas, None) if sub is None else (keys[sub], deltas[sub], sub)

    def _attended_keys(self, perturbation: str, n_keys: int) -> np.ndarray | None:
        """The keys a query may attend to under ``attention_max_keys``: None (all ``n_keys``), or the sorted
        seeded subsample (``default_rng(SeedSequence([fit seed, 9, i]))``, ``i`` the perturbation's place among
        the learned ones)."""
        cap = self.params.get("attention_max_keys")
        if cap is None or n_keys <= cap:
            return None
        i = list(self._pairs).index(perturbation)
        rng = np.random.default_rng(np.random.SeedSequence([self._seed, 9, i]))
        return np.sort(rng.choice(n_keys, size=int(cap), replace=False))

    def _torch_device(self):
        """Where pairing and attention run: None on the CPU (the numpy / POT code), else the execution's torch
        device (:func:`ot_pairing` and :func:`attention_weights` in torch there)."""
        return None if self.execution.kind == "cpu" else self.execution.torch_device

    def _query_latent(self, X) -> np.ndarray:
        """Latents of query cells: posterior means, or seeded draws (the same draws on every call)."""
        previous = self._rng  # set while fitting (predict may run inside a training callback)
        self._rng = (self._draws or self._generator(1)) if self.params["latent_sampling"] else None
        try:
            return self._encode(X)
        finally:
            self._rng = previous

    def _encode(self, X, chunk: int = 4096) -> np.ndarray:
        if self._rng is None:
            return super()._encode(X, chunk)
        import torch

        from ._train import Rows

        self.module.eval()
        out = []
        with torch.no_grad():
            for xb in Rows(X).device_chunks(chunk, self.execution):
                mu, logvar = self.module.encode(xb)
                # the draws come from the CPU generator on every device (the same draws as on the CPU)
                eps = torch.randn(mu.shape, generator=self._rng, dtype=mu.dtype).to(mu.device)
                out.append((mu + torch.exp(0.5 * logvar) * eps).cpu().numpy())
        return np.concatenate(out)

    def _generator(self, stream: int):
        import torch

        return torch.Generator().manual_seed(int(np.random.SeedSequence([self._seed, 7, stream]).generate_state(1)[0]))

    # ----------------------------------------------------------------------------------- persistence
    def _transfer_arrays(self) -> dict[str, np.ndarray]:
        """The control latents once, and per perturbation ``p/<label>/control_index`` and ``p/<label>/paired_delta``
        (one perturbation or many; saves of earlier versions with one perturbation hold ``paired_delta`` alone,
        and still load)."""
        codes = np.unique(self._controls_context, return_inverse=True)[1]  # names: _state_json
        arrays = {"control_latent": self._controls, "control_context_code": codes.astype(np.int32)}
        for label, (rows, delta) in self._pairs.items():
            arrays[f"p/{label}/control_index"] = rows.astype(np.int64)
            arrays[f"p/{label}/paired_delta"] = delta
        return arrays

    def _load_transfer(self, arrays: dict[str, np.ndarray]) -> None:
        self._controls = arrays["control_latent"]
        self._controls_context = np.asarray(self._context_names, dtype=str)[arrays["control_context_code"]]
        if "paired_delta" in arrays:
            self._pairs = {self.trained[0]: (np.arange(len(self._controls)), arrays["paired_delta"])}
        else:
            self._pairs = {label: (arrays[f"p/{label}/control_index"], arrays[f"p/{label}/paired_delta"])
                           for label in self.trained}

    def _state_json(self) -> dict:
        names = np.unique(self._controls_context).tolist()
        return {"seed": self._seed, "control_contexts": names}

    def _load_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        self._seed = state.get("seed")
        self._context_names = list(state.get("control_contexts", []))
        super()._load_state(state, arrays)


# --------------------------------------------------------------------------------------------- pieces


def pair_within_contexts(solve, zc: np.ndarray, zp: np.ndarray, ctx_c: np.ndarray,
                         ctx_p: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Pair the control cells of each context with the perturbed cells of the same context only.

    ``solve(zc_c, zp_c) -> (partner, info)`` is one OT solve (:func:`ot_pairing` with the model's settings);
    it runs once per context of ``ctx_c`` (every one must have perturbed cells in ``ctx_p``). Returns the
    partner of every row of ``zc`` as an index into ``zp`` and a record of the solves: ``within_context``,
    ``converged`` (all of them), ``seconds`` (their sum), their ``warnings`` and ``by_context`` (each solve's
    own record).
    """
    partner = np.empty(len(zc), dtype=np.int64)
    by_context: dict[str, Any] = {}
    for c in np.unique(ctx_c):
        i, j = np.flatnonzero(ctx_c == c), np.flatnonzero(ctx_p == c)
        if len(j) == 0:
            raise ValueError(f"context {c!r} has control cells but no perturbed cells to pair them with")
        part, by_context[str(c)] = solve(zc[i], zp[j])
        partner[i] = j[np.asarray(part)]
    solves = list(by_context.values())
    info = {"method": solves[0].get("method"), "cost": solves[0].get("cost"), "within_context": True,
            "n_control": int(len(zc)), "n_perturbed": int(len(zp)),
            "converged": all(bool(x.get("converged")) for x in solves),
            "seconds": float(sum(x.get("seconds", 0.0) for x in solves)),
            "warnings": [f"{c}: {w}" for c, x in by_context.items() for w in x.get("warnings", [])],
            "by_context": by_context}
    return partner, info


def own_context_shares(partner: np.ndarray, ctx_c: np.ndarray, ctx_p: np.ndarray) -> dict[str, float]:
    """Per context of the control cells: the share of them whose OT partner is a perturbed cell of the same
    context (``partner`` indexes ``ctx_p``)."""
    own = np.asarray(ctx_p)[np.asarray(partner)] == np.asarray(ctx_c)
    return {str(c): float(own[ctx_c == c].mean()) for c in np.unique(ctx_c)}


#: fitting warns (``_warn_cross_context``) for a context with at least CROSS_MIN_CELLS control cells of which the
#: one global OT paired fewer than CROSS_SHARE within the context, *because* its perturbed cells are few: their
#: share of all perturbed cells is below CROSS_SHARE times its share of the control cells (the balanced OT gives
#: every perturbed cell the same mass, so such a context cannot keep most of its control cells). Kang's
#: unbalanced "thin" task (FCGR3A+ Monocytes with 10 % of their stimulated cells) has a share of 0.138 there and
#: loses 0.45 pearson_delta against pairing within contexts (docs/scpram.md). Contexts the latent space does not
#: yet tell apart (a short training) also pair across, but with balanced counts that is not warned.
CROSS_SHARE, CROSS_MIN_CELLS = 0.5, 30


def _warn_cross_context(shares: dict[str, float], ctx_c: np.ndarray, ctx_p: np.ndarray) -> None:
    low = []
    for c, v in shares.items():
        n_c, n_p = int((ctx_c == c).sum()), int((ctx_p == c).sum())
        if v < CROSS_SHARE and n_c >= CROSS_MIN_CELLS and n_p / len(ctx_p) < CROSS_SHARE * n_c / len(ctx_c):
            low.append((v, f"{c} ({v:.0%} paired within; {n_p:,} perturbed for {n_c:,} control cells)"))
    if low:
        warnings.warn(f"scpram's OT paired most training control cells of {', '.join(t for _, t in sorted(low))} "
                      f"with perturbed cells of other contexts, so their deltas carry a change of context too; "
                      f"ot_within_context=true pairs within each context (docs/scpram.md, 'Pairing within "
                      f"contexts').", UserWarning, stacklevel=3)


#: above these, fitting warns that scPRAM's all-pairs steps will be slow (``ScPRAM._warn_quadratic``): the OT
#: pairing's control x perturbed pairs (the 1M-cell screen of benchmarks/bench_scale.py has 9.8e10 and did not
#: finish pairing in 52 minutes on one core; the 203,640-cell one, 4.9e9, paired in minutes) and the training
#: controls each predicted cell attends among; SCALE_CAP is the cap the warnings suggest, the one bench_scale runs
QUADRATIC_PAIRS = 10**10
QUADRATIC_KEYS = 100_000
SCALE_CAP = 20_000

#: about the most bytes of attention held at once: a chunk of query rows' similarities to every key (float64, with
#: their top-k's working copies), and the kept keys and weights of the query rows whose deltas are summed
#: together (scPRAM's prediction); the weights of each row are its own, so the chunks change no number
ATTENTION_BYTES = 256 << 20


def n_attended(ratio: float, n_control: int) -> int:
    """How many control cells each query attends to: ``ceil(ratio * n_control)``, at least 1."""
    return max(1, min(n_control, math.ceil(ratio * n_control - 1e-9)))


def attention_weights(query: np.ndarray, keys: np.ndarray, ratio: float, *, mode: str = "cell",
                      chunk: int = 2048, device=None) -> sp.csr_matrix:
    """Sparse (n_query x n_keys) attention of each query latent over the key latents; rows sum to 1.

    Cosine similarity to every key; the top ``ceil(ratio * n_keys)`` keys are kept with weights proportional to
    their similarity. Negative similarities get weight 0 (a key pointing away from the query is no neighbour);
    a row whose kept similarities are all <= 0 gets equal weights over its kept keys. ``mode="first_cell"``
    gives every row the first query's keys and weights (the ``scpram`` package's ``predict``).

    ``device``: None computes in numpy (float64); a torch device (``"cpu"``, ``"cuda:0"``, ...) computes the
    similarities, the top-k and the weights in torch on that device (float64; float32 on mps), ``chunk`` query
    rows at a time, each chunk's keys and weights moved to the CPU once. Both give the same weights up to
    rounding (``tests/test_devices.py``).
    """
    if mode not in ATTENTION:
        raise InputError(f"attention={mode!r} is not allowed; use one of {', '.join(map(repr, ATTENTION))}.")
    n_q, n_k = len(query), len(keys)
    k = n_attended(ratio, n_k)
    # a chunk's similarities to every key (float64), their negation and argpartition's int64 indices
    chunk = max(1, min(chunk, ATTENTION_BYTES // (24 * max(n_k, 1))))
    rows = query[:1] if mode == "first_cell" else query
    if device is not None:
        idx, w = _attention_torch(rows, keys, k, chunk, device)
    else:
        query = np.asarray(rows, dtype=np.float64)
        keys = np.asarray(keys, dtype=np.float64)
        kn = _unit(keys)
        idx_parts, w_parts = [], []
        for i in range(0, len(query), chunk):
            sim = _unit(query[i:i + chunk]) @ kn.T
            idx = (np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < n_k
                   else np.tile(np.arange(n_k), (len(sim), 1)))
            idx.sort(axis=1)
            s = np.clip(np.take_along_axis(sim, idx, axis=1), 0.0, None)
            tot = s.sum(axis=1, keepdims=True)
            w = np.where(tot > 0, s / np.where(tot > 0, tot, 1.0), 1.0 / k)
            idx_parts.append(idx)
            w_parts.append(w)
        idx, w = np.concatenate(idx_parts), np.concatenate(w_parts)
    if mode == "first_cell":
        idx, w = np.broadcast_to(idx, (n_q, k)), np.broadcast_to(w, (n_q, k))
    indptr = np.arange(0, n_q * k + 1, k, dtype=np.int64)
    out = sp.csr_matrix((np.ravel(w), np.ravel(idx), indptr), shape=(n_q, n_k))
    out.has_sorted_indices = True
    return out


def _attention_torch(query: np.ndarray, keys: np.ndarray, k: int, chunk: int, device) -> tuple[np.ndarray, np.ndarray]:
    """The kept keys (sorted) and weights of :func:`attention_weights`, computed in torch on ``device``."""
    import torch

    from ._train import wide_float

    dev = torch.device(device)
    dtype = wide_float(dev)
    n_k = len(keys)
    kn = _unit_t(torch.as_tensor(np.ascontiguousarray(keys)).to(dev, dtype))
    q_all = torch.as_tensor(np.ascontiguousarray(query))
    idx_parts, w_parts = [], []
    for i in range(0, len(q_all), chunk):
        sim = _unit_t(q_all[i:i + chunk].to(dev, dtype)) @ kn.T
        if k < n_k:
            idx = torch.topk(sim, k, dim=1, sorted=False).indices.sort(dim=1).values
        else:
            idx = torch.arange(n_k, device=dev).expand(len(sim), n_k)
        s = sim.gather(1, idx).clamp(min=0.0)
        tot = s.sum(dim=1, keepdim=True)
        w = torch.where(tot > 0, s / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.full_like(s, 1.0 / k))
        idx_parts.append(idx.cpu().numpy())
        w_parts.append(w.cpu().numpy().astype(np.float64, copy=False))
    if not idx_parts:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k))
    return np.concatenate(idx_parts), np.concatenate(w_parts)


def _unit_t(x):
    import torch

    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _validate(p: dict) -> None:
    def bad(key, fix):
        raise InputError(f"scpram: {key}={p[key]!r} is not allowed; {fix}")

    def number(key):
        return isinstance(p[key], (int, float)) and not isinstance(p[key], bool) and math.isfinite(p[key])

    if not number("ratio") or not 0 < p["ratio"] <= 1:
        bad("ratio", "give the share of training control cells to attend to, in (0, 1] (reference 0.05).")
    if p["ot"] not in OT_METHODS:
        bad("ot", "use 'sinkhorn' (entropic, default) or 'exact' (EMD).")
    if p["ot_cost"] not in OT_COSTS:
        bad("ot_cost", "use 'sqeuclidean' (default) or 'euclidean' (the scpram package).")
    if p["attention"] not in ATTENTION:
        bad("attention", "use 'cell' (published, per-cell) or 'first_cell' (reproduces the scpram package).")
    if not number("ot_reg") or p["ot_reg"] <= 0:
        bad("ot_reg", "give a positive entropic regularisation relative to the median cost, e.g. 0.05.")
    if not number("ot_tol") or p["ot_tol"] <= 0:
        bad("ot_tol", "give a positive marginal tolerance, e.g. 1e-3.")
    if p["ot_max_iter"] is not None and (isinstance(p["ot_max_iter"], bool) or not isinstance(p["ot_max_iter"], int)
                                         or p["ot_max_iter"] < 1):
        bad("ot_max_iter", "give a positive integer, or None for the method's default.")
    if not number("ot_dense_max_gb") or p["ot_dense_max_gb"] <= 0:
        bad("ot_dense_max_gb", f"give the largest dense cost matrix in GiB, a positive number (default "
                               f"{DENSE_MAX_GB}).")
    if p["ot_max_candidates"] is not None and (isinstance(p["ot_max_candidates"], bool)
                                               or not isinstance(p["ot_max_candidates"], int)
                                               or p["ot_max_candidates"] < 1):
        bad("ot_max_candidates", "give a positive integer, or None to search all perturbed cells.")
    if p["attention_max_keys"] is not None and (isinstance(p["attention_max_keys"], bool)
                                                or not isinstance(p["attention_max_keys"], int)
                                                or p["attention_max_keys"] < 1):
        bad("attention_max_keys", "give a positive integer, or None to attend among every training control cell.")
    if not isinstance(p["latent_sampling"], bool):
        bad("latent_sampling", "use true or false.")
    if not isinstance(p["ot_within_context"], bool):
        bad("ot_within_context", "use true (pair control and perturbed cells inside each context) or false "
                                 "(one OT over all paired contexts, as the scpram package).")
