"""The frozen descriptions a run starts from: :class:`PerturbSpec` (which obs columns and labels describe the
perturbation) and :class:`Preprocessing` (how the input becomes the models' log-normalised matrix).

Plain dataclasses without heavy imports, so that configs can be read without loading numpy or scanpy; the
functions that use them live in :mod:`perturbkit.data`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from . import _keys as K
from .errors import InputError


@dataclass(frozen=True)
class PerturbSpec:
    """Which obs columns and labels describe the perturbation.

    Parameters
    ----------
    condition_key
        obs column holding the condition of each cell.
    control, perturbed
        the two labels of ``condition_key`` to compare.
    context_key
        obs column of the context a response is predicted for (usually the cell type).
    donor_key
        optional obs column of the donor / batch / study (used by cross-donor scenarios).
    """

    condition_key: str = K.CONDITION
    control: str = K.CONTROL
    perturbed: str = K.PERTURBED
    context_key: str = K.CONTEXT
    donor_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, adata, *, holdout: str | None = None, min_cells: int = 3) -> None:
        """Check that ``adata`` carries this spec; raise :class:`InputError` naming the fix otherwise."""
        from .data import validate

        validate(adata, self, holdout=holdout, min_cells=min_cells)


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
