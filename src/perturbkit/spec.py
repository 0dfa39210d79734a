"""The frozen descriptions a run starts from: :class:`PerturbSpec` (which obs columns and labels describe the
perturbation) and :class:`Preprocessing` (how the input becomes the models' log-normalised matrix).

Plain dataclasses without heavy imports, so that configs can be read without loading numpy or scanpy; the
functions that use them live in :mod:`perturbkit.data`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from . import _keys as K
from .errors import InputError


@dataclass(frozen=True)
class PerturbSpec:
    """Which obs columns and labels describe the perturbation(s).

    Parameters
    ----------
    condition_key
        obs column holding the condition of each cell.
    control
        the label of the control cells.
    perturbed
        the perturbation(s) to learn and predict: one label (the two-condition case, e.g. ``"stimulated"``), a
        list of labels, or ``"all"`` (every label of ``condition_key`` except ``control``, in sorted order).
    context_key
        obs column of the context a response is predicted for (cell type, cell line, donor).
    donor_key
        optional obs column of the donor / batch / study (used by cross-donor scenarios).
    combo_delimiter
        joins the labels of a combination of perturbations (``"KLF1+MAP2K6"`` with ``"+"``).
    """

    condition_key: str = K.CONDITION
    control: str = K.CONTROL
    perturbed: str | tuple[str, ...] = K.PERTURBED
    context_key: str = K.CONTEXT
    donor_key: str | None = None
    combo_delimiter: str = "+"

    def __post_init__(self):
        if isinstance(self.perturbed, list):
            object.__setattr__(self, "perturbed", tuple(self.perturbed))
        if isinstance(self.perturbed, tuple):
            bad = [p for p in self.perturbed if not isinstance(p, str)]
            if bad or not self.perturbed:
                raise InputError(f"perturbed must be a label, a non-empty list of labels or 'all', got "
                                 f"{list(self.perturbed)!r}.", params=("perturbed",))
            if len(set(self.perturbed)) != len(self.perturbed):
                raise InputError(f"perturbed lists a label twice: {list(self.perturbed)!r}.", params=("perturbed",))
        if not isinstance(self.combo_delimiter, str) or not self.combo_delimiter.strip():
            raise InputError(f"combo_delimiter must be a non-empty string such as '+', got {self.combo_delimiter!r}.",
                             params=("combo_delimiter",))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["perturbed"] = list(self.perturbed) if isinstance(self.perturbed, tuple) else self.perturbed
        return d

    @property
    def single(self) -> bool:
        """True for the two-condition case: ``perturbed`` is one label (not a list, not ``"all"``)."""
        return not isinstance(self.perturbed, tuple) and self.perturbed != "all"

    def perturbations(self, adata) -> list[str]:
        """The requested perturbation labels (``"all"`` resolved against ``adata.obs``; a list as given)."""
        if self.single:
            return [self.perturbed]
        if self.perturbed == "all":
            labels = set(adata.obs[self.condition_key].astype(str).unique()) - {self.control}
            return sorted(labels)
        return list(self.perturbed)

    def singles(self, label: str) -> tuple[str, ...]:
        """The single perturbations a label combines (``("KLF1", "MAP2K6")``; ``(label,)`` for a single one)."""
        return tuple(part.strip() for part in label.split(self.combo_delimiter)) if self.is_combination(label) \
            else (label,)

    def is_combination(self, label: str) -> bool:
        return self.combo_delimiter in label

    def for_label(self, label: str) -> PerturbSpec:
        """The two-condition spec of one perturbation (control vs ``label``)."""
        return replace(self, perturbed=label)


@dataclass(frozen=True)
class Preprocessing:
    """How to turn the input into the log-normalised matrix the models use (the ``[preprocessing]`` table).

    Parameters
    ----------
    normalize
        ``"auto"``: ``normalize_total`` + ``log1p`` only when the input looks like raw counts; ``True`` / ``False``:
        always / never.
    target_sum
        ``normalize_total``'s total per cell.
    n_top_genes
        highly variable genes to keep (scanpy, ``hvg_flavor``); ``0`` keeps every gene.
    hvg_flavor
        scanpy's ``highly_variable_genes`` flavour.
    """

    normalize: bool | Literal["auto"] = "auto"
    target_sum: float = 1e4
    n_top_genes: int = 2000
    hvg_flavor: str = "seurat"

    def check(self) -> None:
        """Raise :class:`InputError` naming the parameter when a value is not allowed."""
        if not (self.normalize == "auto" or isinstance(self.normalize, bool)):
            raise InputError(f"normalize must be 'auto' (detect raw counts), true or false, got "
                             f"{self.normalize!r}.", params=("normalize",))
        if isinstance(self.n_top_genes, bool) or not isinstance(self.n_top_genes, int):
            raise InputError(f"n_top_genes must be an integer >= 0 (0 keeps all genes), got "
                             f"{self.n_top_genes!r}.", params=("n_top_genes",))
        if self.n_top_genes < 0:
            raise InputError(f"n_top_genes must be >= 0 (0 keeps all genes), got {self.n_top_genes}.",
                             params=("n_top_genes",))
        if isinstance(self.target_sum, bool) or not isinstance(self.target_sum, int | float) \
                or not self.target_sum > 0:
            raise InputError(f"target_sum must be a positive number, got {self.target_sum!r}.")
