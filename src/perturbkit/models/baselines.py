"""Honest baselines: no change, the mean expression shift learned on the training contexts, and the additive
baseline for combinations (the sum of the singles' shifts)."""

from __future__ import annotations

import numpy as np

from ..data import PerturbSpec
from ..errors import InputError
from ._base import Model, balanced_means, dense, group_means, pair_labels


class Control(Model):
    """Predict the source (control) cells unchanged: the no-response baseline."""

    name = "control"
    BASELINE = True
    NO_CHANGE = True
    COMBINES = True  # nothing to combine: every perturbation is predicted as no change

    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool) -> None:
        self.fit_info = {"description": "prediction = source cells unchanged"}

    def _predict_matrix(self, source, perturbation: str) -> np.ndarray:
        return dense(source.X)


class MeanShift(Model):
    """Add the class-balanced mean expression difference (perturbed - control) of the training cells.

    One shift per perturbation: within each condition every context seen with both the control and that
    perturbation weighs the same, as in scGen's latent delta; the shift is applied in expression space instead
    of latent space.
    """

    name = "mean_shift"
    BASELINE = True

    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool) -> None:
        X = adata.X  # sparse or on disk: the means are streamed (models._base.group_means), never densified
        cond = adata.obs[spec.condition_key].astype(str).to_numpy()
        ctx = adata.obs[spec.context_key].astype(str).to_numpy()
        pairs = pair_labels(cond, ctx)
        means = group_means(X, pairs, np.unique(pairs))  # one pass for every perturbation
        self.shifts = {}
        for p in self.trained:
            ctrl, pert = balanced_means(X, cond, ctx, spec.for_label(p), means=means)
            self.shifts[p] = (pert - ctrl).astype(np.float32)
        self.fit_info = {"description": self.DESCRIPTION}

    DESCRIPTION = "prediction = source + balanced mean(perturbed) - mean(control)"

    def shift(self, perturbation: str) -> np.ndarray:
        """The expression shift added to the source cells for ``perturbation``."""
        return self.shifts[perturbation]

    def _predict_matrix(self, source, perturbation: str) -> np.ndarray:
        return dense(source.X) + self.shift(perturbation)[None, :]

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {f"shift/{p}": v for p, v in self.shifts.items()}  # earlier saves of one: "shift" (still loads)

    def _load_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        if "shift" in arrays:
            self.shifts = {self.trained[0]: arrays["shift"]}
        else:
            self.shifts = {k[len("shift/"):]: v for k, v in arrays.items() if k.startswith("shift/")}


class Additive(MeanShift):
    """The additive baseline: a combination ``A+B`` is the source plus the sum of its singles' mean shifts.

    A single perturbation gets its own mean shift (as :class:`MeanShift`); a combination always gets the sum of
    its singles' shifts, even when the combination itself was in the training data.
    """

    name = "additive"
    COMBINES = True
    DESCRIPTION = "prediction = source + sum of the singles' balanced mean shifts (combinations)"

    def can_predict(self, perturbation: str) -> bool:
        if self.spec.is_combination(perturbation):  # always from its singles, so they must have been learned
            return all(s in self.trained for s in self.spec.singles(perturbation))
        return perturbation in self.trained

    def shift(self, perturbation: str) -> np.ndarray:
        if self.spec.is_combination(perturbation):
            return np.sum([self.shifts[s] for s in self.spec.singles(perturbation)], axis=0, dtype=np.float32)
        return self.shifts[perturbation]


class PerturbedMean(Model):
    """The perturbed-mean baseline: every predicted cell is the mean of every perturbed training cell.

    Systema's "perturbed mean" (Viñas Torné et al., Nat Biotechnol 2025) and the Virtual Cell Challenge 2025's
    cell-mean baseline: the mean expression over all training cells that carry any perturbation (every label but
    the control, pooled; each cell weighs the same), whatever the perturbation asked for and whatever the source
    cells. It learns the response common to all perturbations and the expression of the training contexts, and
    nothing of the one asked for: a model that does not beat it has learned no perturbation-specific effect.

    Tasks: every task, including perturbations never seen in training (an unseen combination is predicted as
    the same mean). Every predicted cell is the same profile, so distribution metrics (``edistance``, ``mmd``)
    score a point mass: they measure the spread it lacks as well as the mean it misses.
    """

    name = "perturbed_mean"
    BASELINE = True
    COMBINES = True
    DESCRIPTION = "prediction = the mean of every perturbed training cell (all perturbations pooled), every cell"

    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool) -> None:
        cond = adata.obs[spec.condition_key].astype(str).to_numpy()
        rows = np.flatnonzero(cond != spec.control)
        self.mean = _row_mean(adata.X, rows)
        self.fit_info = {"description": self.DESCRIPTION, "n_cells": int(rows.size)}

    def can_predict(self, perturbation: str) -> bool:
        return isinstance(perturbation, str) and perturbation != self.spec.control

    def _predict_matrix(self, source, perturbation: str) -> np.ndarray:
        return np.broadcast_to(self.mean, (source.n_obs, self.mean.size)).copy()

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean}

    def _load_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        self.mean = arrays["mean"]


class Linear(MeanShift):
    """The linear baseline: the mean shift plus a ridge map of the context's control profile in PCA space.

    In the spirit of Ahlmann-Eltze, Huber & Anders (Nat Methods 2025), whose linear model ``Y ~ G W P^T`` (``G``:
    a PCA gene embedding of the training data, ``P``: a condition embedding, ``W`` by ridge regression) matched or
    beat the deep models, and of PerturBench's linear baseline (Wu et al. 2024). Here the condition that varies
    is the context (cell type, donor, cell line), so its embedding is its control profile. Exactly:

    * ``delta[c, p] = mean(p cells of c) - mean(control cells of c)`` for every training context ``c`` that has
      both, and ``b[p]`` their mean over those contexts (= :class:`MeanShift`'s shift).
    * ``V``: the top ``n_components`` principal axes (genes x K) of the training cells (at most 20,000 of them,
      drawn with the fit's seed); ``z[c] = V^T (mean(control cells of c) - m)``, ``m`` the mean of the
      control means of the contexts that have a ``delta``.
    * ``W`` (K x K, shared by all perturbations: a screen has few contexts, and pooling the perturbations gives
      it contexts x perturbations observations) minimises
      ``sum over (c, p) of |V^T (delta[c, p] - b[p]) - W z[c]|^2 + lambda |W|^2``.
    * The prediction for the source cells of context ``c*``: each cell ``+ b[p] + V W z[c*]`` (``z[c*]`` from the
      mean of the source cells of that context).
    * ``lambda`` is chosen from ``alphas`` (times the mean squared norm of ``z``) by leave-one-context-out
      cross-validation on the training contexts (the held-out context's ``b``, ``m`` and ``W`` refitted without
      it), error in gene space; ``inf`` is in the grid, where ``W = 0`` and the model is :class:`MeanShift`.
      With fewer than 3 training contexts there is nothing to cross-validate and ``W = 0``.

    Why this definition: the task perturbkit benchmarks is transfer to an unseen context, and the one thing a
    context offers is its control cells; a linear map from their profile to the response is the simplest model
    that can use it, and the cross-validation makes it no worse than the mean shift on the training contexts.

    Tasks: context transfer of perturbations seen in training (``loco``, ``unbalanced``, ``cross_donor``,
    ``context_transfer``); not unseen combinations (use ``additive``).
    """

    name = "linear"
    DEFAULTS = {"n_components": 10, "alphas": [0.01, 0.1, 1.0, 10.0, 100.0, float("inf")]}
    DESCRIPTION = ("prediction = source + mean shift + V W z(context control mean), W by ridge with "
                   "leave-one-context-out lambda")

    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool) -> None:
        k = int(self.params.get("n_components", self.DEFAULTS["n_components"]))
        alphas = [float(a) for a in self.params.get("alphas", self.DEFAULTS["alphas"])]
        if k < 1 or not alphas or any(not a >= 0 for a in alphas):
            raise InputError(f"linear: n_components must be >= 1 and alphas a non-empty list of numbers >= 0 "
                             f"(inf allowed), got n_components={k!r}, alphas={alphas!r}.")
        cond = adata.obs[spec.condition_key].astype(str).to_numpy()
        ctx = adata.obs[spec.context_key].astype(str).to_numpy()
        means = _group_means(adata.X, cond, ctx)  # (condition, context) -> mean row
        self.axes = _principal_axes(adata.X, k, seed)
        pairs = [(c, p) for p in self.trained for (q, c) in means if q == p and (spec.control, c) in means]
        # b[p]: mean_shift's own shifts (the same definition), so that with W = 0 the predictions are
        # mean_shift's to the bit, not to float32 rounding (a tie, not a win, in share_beats_mean_shift)
        MeanShift._fit(self, adata, spec, seed=seed, progress=progress)
        contexts = sorted({c for c, _ in pairs})
        lam, cv = np.inf, {}
        if len(contexts) >= 3:
            cv = {a: _loco_error(means, spec.control, pairs, contexts, self.axes, a) for a in alphas}
            lam = min(cv, key=lambda a: (cv[a], -a))  # ties: the stronger penalty
        self.center, self.weights = _ridge(means, spec.control, pairs, self.axes, lam)
        self.fit_info = {"description": self.DESCRIPTION, "n_components": int(self.axes.shape[1]),
                         "contexts": contexts, "alpha": _number(lam),
                         "cv_error": {str(a): _number(e) for a, e in cv.items()}}

    _whole = None  # the context means of the whole source while predict_chunks predicts it in pieces

    def shift(self, perturbation: str, source=None, *, mean=None) -> np.ndarray:
        """The shift for ``perturbation`` in the context whose control cells are ``source`` (or whose control
        mean is ``mean``; neither: the mean shift ``b[p]``)."""
        base = self.shifts[perturbation]
        if source is None and mean is None:
            return base
        if mean is None:
            mean = _row_mean(source.X, np.arange(source.n_obs))
        z = (mean - self.center) @ self.axes
        return (base + self.axes @ (self.weights @ z)).astype(np.float32)

    def _context_means(self, source) -> dict:
        """Context label (None without a context column) -> the float32 mean of its cells in ``source``."""
        key = self.spec.context_key
        if key not in source.obs:
            return {None: _row_mean(source.X, np.arange(source.n_obs))}
        ctx = source.obs[key].astype(str).to_numpy()
        return {c: _row_mean(source.X, np.flatnonzero(ctx == c)) for c in np.unique(ctx)}

    def predict_chunks(self, source, perturbation: str, chunk: int):
        """As :meth:`Model.predict_chunks`, each context's shift from the mean of all its source cells (not of
        the piece's)."""
        if source.n_obs <= chunk:
            yield from super().predict_chunks(source, perturbation, chunk)
            return
        self._whole = self._context_means(source)
        try:
            yield from super().predict_chunks(source, perturbation, chunk)
        finally:
            self._whole = None

    def _predict_matrix(self, source, perturbation: str) -> np.ndarray:
        X = dense(source.X).copy()  # dense() may return source.X itself
        means = self._whole or self._context_means(source)  # one shift per source context, from its control mean
        key = self.spec.context_key
        if key not in source.obs:
            return X + self.shift(perturbation, mean=means[None])[None, :]
        ctx = source.obs[key].astype(str).to_numpy()
        for c, mean in means.items():
            X[ctx == c] += self.shift(perturbation, mean=mean)[None, :]
        return X

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {**super()._state_arrays(), "axes": self.axes, "center": self.center, "weights": self.weights}

    def _load_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        super()._load_state(state, {k: v for k, v in arrays.items() if k.startswith("shift/")})
        self.axes, self.center, self.weights = arrays["axes"], arrays["center"], arrays["weights"]


def _row_mean(X, rows: np.ndarray) -> np.ndarray:
    """The mean of ``X[rows]`` (float64 sums of float32 rows, in chunks) as float32."""
    total = np.zeros(X.shape[1], dtype=np.float64)
    for start in range(0, rows.size, 4096):
        total += dense(X[rows[start:start + 4096]]).sum(axis=0, dtype=np.float64)
    return (total / max(rows.size, 1)).astype(np.float32)


def _group_means(X, cond: np.ndarray, ctx: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """(condition, context) -> mean expression row, as float64."""
    out = {}
    for key in sorted(set(zip(cond, ctx))):
        rows = np.flatnonzero((cond == key[0]) & (ctx == key[1]))
        out[key] = _row_mean(X, rows).astype(np.float64)
    return out


def _principal_axes(X, k: int, seed: int, max_cells: int = 20_000) -> np.ndarray:
    """The top ``k`` principal axes (genes x k, float64) of the rows of ``X`` (a seeded sample of
    ``max_cells``)."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(X.shape[0], max_cells, replace=False)) if X.shape[0] > max_cells \
        else np.arange(X.shape[0])
    Y = dense(X[rows]).astype(np.float64)
    k = max(1, min(k, Y.shape[0] - 1, Y.shape[1]))
    # copy=False: Y is this function's own array, centred in place (one copy fewer; the same arithmetic)
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed, copy=False).fit(Y)
    return pca.components_.T.copy()


def _number(v: float) -> float | str:
    """A float for JSON records ("inf" as text)."""
    return float(v) if np.isfinite(v) else "inf"


def _ridge(means, control: str, pairs, axes: np.ndarray, lam: float):
    """``(m, W)`` of the ridge fit on ``pairs`` ((context, perturbation)) with penalty ``lam`` times the mean
    squared norm of ``z`` (``inf``: ``W = 0``); ``m``: the mean control profile of the pairs' contexts."""
    center = np.mean([means[control, c] for c in sorted({c for c, _ in pairs})], axis=0)
    k = axes.shape[1]
    if not pairs or not np.isfinite(lam):
        return center.astype(np.float32), np.zeros((k, k))
    shift = {p: np.mean([means[q, c] - means[control, c] for c, q in pairs if q == p], axis=0)
             for p in {p for _, p in pairs}}
    Z = np.stack([(means[control, c] - center) @ axes for c, _ in pairs])           # n x k
    R = np.stack([(means[p, c] - means[control, c] - shift[p]) @ axes for c, p in pairs])  # n x k
    scale = max(float(np.mean(np.sum(Z * Z, axis=1))), 1e-12)
    W = np.linalg.solve(Z.T @ Z + lam * scale * np.eye(k), Z.T @ R).T  # R ~ Z W^T
    return center.astype(np.float32), W


def _loco_error(means, control: str, pairs, contexts, axes: np.ndarray, lam: float) -> float:
    """The mean squared gene-space error of the delta of each training context when it is left out."""
    errors = []
    for held in contexts:
        train = [(c, p) for c, p in pairs if c != held]
        center, W = _ridge(means, control, train, axes, lam)
        z = (means[control, held] - center) @ axes
        for c, p in pairs:
            if c != held:
                continue
            others = [means[p, o] - means[control, o] for o, q in train if q == p]
            if not others:
                continue
            pred = np.mean(others, axis=0) + axes @ (W @ z)
            errors.append(float(np.mean((means[p, c] - means[control, c] - pred) ** 2)))
    return float(np.mean(errors)) if errors else float("inf")
