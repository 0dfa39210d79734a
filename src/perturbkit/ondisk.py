"""Data that stays on disk: an ``.h5ad`` opened with ``obs`` and ``var`` in memory and ``X`` read in row chunks,
validation in chunks, and out-of-core preprocessing into a cached ``.h5ad`` written chunk by chunk.

How the file is read: with h5py and anndata's own element readers, ``anndata.io.read_elem`` for ``obs``,
``var`` (and ``uns`` when asked), ``anndata.io.sparse_dataset`` for a CSR ``X`` (a row slice reads only its part
of ``indptr``, ``indices`` and ``data``) and the h5py dataset itself for a dense ``X``. Nothing else is read. Not anndata's backed mode:
``read_h5ad(path, backed="r")`` reads every other element (``layers``, ``obsm``, ``obsp``, ``uns``) into memory,
and a counts layer is as large as ``X``. Not ``anndata.experimental.read_lazy``: it needs xarray and dask (not
dependencies of perturbkit), gives ``obs`` lazily where perturbkit wants it in memory (splits, validation), and
is experimental.

A CSC ``X`` is refused (a row chunk of a CSC matrix reads the whole matrix). Every read first compares the
file's size, modification time and inode with those seen when it was opened: a file that changes while it is
read stops with one :class:`~perturbkit.errors.InputError`, and a truncated or corrupt one too.

Out-of-core preprocessing (:func:`preprocess_to_disk`, cached by :func:`preprocessed`) gives the result of
:func:`perturbkit.data.preprocess`: ``normalize_total`` + ``log1p`` run by scanpy on each chunk (both act row
by row, so the values are those of the whole matrix, byte for byte), highly variable genes from per-gene sums
accumulated over the chunks (scanpy's ``seurat`` and ``cell_ranger`` flavours), and the selected genes written
once, chunk by chunk, as CSR into a temporary file renamed at the end.

Streamed training: ``OnDisk[rows]`` is a :class:`View` of some cells (a split's training set: ``obs`` of those
cells, ``X`` still on disk, nothing copied), which the models take as they take an AnnData; they read it with
``DiskMatrix.take`` (rows read in sorted order, returned in the order asked) and ``DiskMatrix.chunks``, through
:class:`perturbkit.models._train.Rows` (mini-batches read in groups on a background thread). See docs/ondisk.md.
"""

from __future__ import annotations

import contextlib

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import _keys as K
from .data import ValueStats, _notices, _ValueScan, value_stats  # noqa: F401  (the validation's scan lives in data.py,
#   which reads a DiskMatrix's values through DiskMatrix.value_stats and never imports this module)
from .errors import InputError, InputWarning

#: bytes of one chunk of X as dense float32 (sets the rows per chunk; a sparse chunk holds less)
CHUNK_BYTES = 64 << 20
#: a read of sorted rows that fill at least this share of the range they span reads the range (one slice) and
#: keeps them in memory; sparser ones are read row by row (h5py's point selection)
DENSE_SPAN = 0.5
#: the rows scanned to decide whether X holds raw counts (as :func:`perturbkit.data.looks_like_counts`)
COUNTS_ROWS = 2000
#: the highly-variable-gene flavours computed from per-gene sums (the others need all values at once)
HVG_FLAVORS = ("seurat", "cell_ranger")
#: scanpy's default number of mean bins
N_BINS = 20


def chunk_rows(n_vars: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk: as many as fit ``budget`` bytes as dense float32, at least 64."""
    return max(64, int(budget // (4 * max(int(n_vars), 1))))


# ------------------------------------------------------------------------------------------ the file


@dataclass(frozen=True)
class _Stamp:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> _Stamp:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


#: glibc's ``M_MMAP_THRESHOLD`` while a file is read on disk: blocks of at least this many bytes are mapped and
#: given back to the system when freed (see :func:`_give_back_large_blocks`)
MMAP_THRESHOLD = 1 << 20
_MMAP_SET = False


def _give_back_large_blocks() -> None:
    """Fix glibc malloc's mmap threshold at :data:`MMAP_THRESHOLD`, once per process (glibc only; elsewhere
    nothing is done).

    Reading a file in blocks allocates and frees blocks of megabytes, many of them on the prefetch thread. glibc
    raises its mmap threshold each time such a mapped block is freed (up to 32 MiB), after which blocks of that
    size come from the heap arenas, which only give memory back from their top: at the 1M-cell screen of
    ``benchmarks/bench_scale.py`` the freed blocks of encoding the training cells made the fit the run's peak
    (4,129 MB; 1,688 MB with the threshold fixed: ``benchmarks/results/scale.md``, docs/ondisk.md).
    ``mallopt(M_MMAP_THRESHOLD, n)`` fixes the threshold (it also stops the dynamic adjustment), so such blocks
    are mapped and unmapped; smaller allocations are unaffected. Set when the first :class:`OnDisk` is opened:
    only runs that read on disk are changed."""
    global _MMAP_SET
    if _MMAP_SET:
        return
    _MMAP_SET = True
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return
    M_MMAP_THRESHOLD = -3  # malloc.h
    mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD))


class OnDisk:
    """An ``.h5ad`` file with ``obs`` and ``var`` in memory and ``X`` on disk (a :class:`DiskMatrix`).

    It has the attributes of an AnnData that the checks of :mod:`perturbkit.data` read (``X``, ``obs``, ``var``,
    ``obs_names``, ``var_names``, ``n_obs``, ``n_vars``), so :func:`~perturbkit.data.check_matrix` and
    :func:`~perturbkit.data.validate` take it and scan ``X`` in chunks. Use it as a context manager, or call
    :meth:`close`. ``what`` names the parameter in error messages (as in :func:`perturbkit.data.read_h5ad`).
    """

    def __init__(self, path: str | os.PathLike, what: str = "data", *, chunk_size: int | None = None):
        import h5py
        from anndata.io import read_elem

        from .data import check_h5ad

        self.path, self.what = Path(path), what
        check_h5ad(self.path, what)
        _give_back_large_blocks()
        self._stamp = _Stamp.of(self.path)
        self._file = None
        try:
            self._file = h5py.File(self.path, "r")
            if "X" not in self._file:
                raise InputError(f"{what}: {str(self.path)!r} holds no X (the AnnData has no expression matrix); "
                                 "write it with the matrix in adata.X.", params=(what,))
            self.obs: pd.DataFrame = read_elem(self._file["obs"])
            self.var: pd.DataFrame = read_elem(self._file["var"])
            self.X = DiskMatrix(self, self._file["X"], chunk_size)
        except InputError:
            self.close()
            raise
        except Exception as exc:  # h5py/anndata raise many types for truncated or corrupt files
            self.close()
            raise self._corrupt(exc) from None
        self._check_unchanged()
        if self.X.shape != (len(self.obs), len(self.var)):
            shape = self.X.shape
            self.close()
            raise InputError(f"{what}: {str(self.path)!r} has X of shape {shape} but {len(self.obs)} obs and "
                             f"{len(self.var)} var rows; write it again with adata.write_h5ad(path).",
                             params=(what,))
        self._uns: dict | None = None

    # the AnnData-like surface
    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_obs, self.n_vars

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    @property
    def uns(self) -> dict:
        """The file's ``uns``, read on first use."""
        if self._uns is None:
            from anndata.io import read_elem

            self._uns = dict(self._read(lambda: read_elem(self._file["uns"]) if "uns" in self._file else {},
                                        "uns"))
        return self._uns

    def __repr__(self) -> str:
        return (f"OnDisk({str(self.path)!r}: {self.n_obs} cells x {self.n_vars} genes, X {self.X.format} "
                f"{self.X.dtype} on disk)")

    def __enter__(self) -> OnDisk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def to_memory(self):
        """An in-memory AnnData (``X`` read chunk by chunk and stacked; ``obs``, ``var``, ``uns`` copied)."""
        import anndata as ad

        return ad.AnnData(X=self.X.to_memory(), obs=self.obs.copy(), var=self.var.copy(), uns=dict(self.uns))

    def __getitem__(self, rows) -> View:
        """The cells ``rows`` (integer indices or a boolean mask) as a :class:`View`: ``obs`` of those cells,
        ``X`` read from this file when asked (no row is read here). A split's training set stays on disk."""
        return View(self, rows)

    # reading with the checks
    def _corrupt(self, exc: BaseException) -> InputError:
        return InputError(f"{self.what}: {str(self.path)!r} could not be read as AnnData ({type(exc).__name__}: "
                          f"{exc}). The file may be truncated or corrupt; write it again with "
                          "adata.write_h5ad(path).", params=(self.what,))

    def _check_unchanged(self, where: str = "") -> None:
        try:
            now = _Stamp.of(self.path)
        except FileNotFoundError:
            now = None
        if now != self._stamp:
            change = "was removed" if now is None else (
                f"changed (size {self._stamp.size} -> {now.size} bytes)" if now.size != self._stamp.size
                else "changed (new modification time)")
            raise InputError(f"{self.what}: {str(self.path)!r} {change} while it was read{where}; nothing was "
                             "written. Let whatever writes it finish, then run again.", params=(self.what,))

    def _read(self, fn: Callable[[], Any], where: str) -> Any:
        if self._file is None:
            raise InputError(f"{self.what}: {str(self.path)!r} was closed; open it again with OnDisk(path).")
        self._check_unchanged(f" (before {where})")
        try:
            out = fn()
        except InputError:
            raise
        except Exception as exc:
            self._check_unchanged(f" (at {where})")
            raise self._corrupt(exc) from None
        self._check_unchanged(f" (at {where})")
        return out


class View:
    """Some cells of an :class:`OnDisk` file, as :meth:`OnDisk.__getitem__` gives them: ``obs`` of those cells in
    memory, ``var`` and ``uns`` of the file, and ``X`` a :class:`DiskMatrix` of those rows (read from the file
    when asked, with its checks). The AnnData-like surface of :class:`OnDisk` (``n_obs``, ``obs_names``, ...,
    ``to_memory()``, ``rows[idx]``), so models, checks and splits take it where they take an AnnData. It lives
    as long as the file is open."""

    def __init__(self, parent: OnDisk | View, rows):
        idx = np.asarray(np.arange(parent.n_obs)[rows], dtype=np.int64)
        if idx.ndim != 1:
            raise TypeError(f"rows of an on-disk file are selected by a 1-d index or mask, got shape {idx.shape}")
        self._parent = parent
        self.path, self.what = parent.path, parent.what
        obs = parent.obs.iloc[idx].copy()
        for col in obs.columns:  # as an AnnData subset: the categories no kept cell has are dropped
            if isinstance(obs[col].dtype, pd.CategoricalDtype):
                obs[col] = obs[col].cat.remove_unused_categories()
        self.obs: pd.DataFrame = obs
        self.var: pd.DataFrame = parent.var
        self.X = parent.X.select(idx)

    n_obs, n_vars, shape = OnDisk.n_obs, OnDisk.n_vars, OnDisk.shape
    obs_names, var_names = OnDisk.obs_names, OnDisk.var_names
    to_memory = OnDisk.to_memory

    @property
    def uns(self) -> dict:
        return self._parent.uns

    def __getitem__(self, rows) -> View:
        return View(self, rows)

    def __repr__(self) -> str:
        return f"View({self.n_obs} of the cells of {str(self.path)!r}, X {self.X.format} {self.X.dtype} on disk)"


class DiskMatrix:
    """``X`` of an :class:`OnDisk` file: ``shape``, ``dtype``, ``format`` (``"csr"`` or ``"dense"``), and reads
    that return in-memory blocks (a ``scipy.sparse.csr_matrix`` or a numpy array).

    ``X[a:b]`` and :meth:`rows` read a row range; :meth:`take` reads rows in sorted order and returns them in the
    order asked; :meth:`chunks` iterates over row ranges or over batches of given rows. :meth:`select` gives the
    matrix of some of the rows (a view: row ``i`` of it is row ``index[i]`` of the file), which reads the same
    way.
    """

    ndim = 2
    #: the file rows of a view made by :meth:`select` (None: every row, in order)
    index: np.ndarray | None = None

    def __init__(self, owner: OnDisk, elem, chunk_size: int | None = None):
        import h5py
        from anndata.io import sparse_dataset

        self._owner = owner
        if isinstance(elem, h5py.Dataset):
            if elem.ndim != 2:
                raise InputError(f"{owner.what}: X of {str(owner.path)!r} has {elem.ndim} dimensions; expected a "
                                 "cells x genes matrix.", params=(owner.what,))
            self._ds, self.format = elem, "dense"
            self.shape, self.dtype = tuple(int(n) for n in elem.shape), elem.dtype
        else:
            encoding = elem.attrs.get("encoding-type", "")
            if encoding == "csc_matrix":
                raise InputError(
                    f"{owner.what}: X of {str(owner.path)!r} is stored as CSC (column-major), which cannot be read "
                    "in row chunks. Write it as CSR: adata.X = adata.X.tocsr(); adata.write_h5ad(path).",
                    params=(owner.what,))
            if encoding != "csr_matrix":
                raise InputError(f"{owner.what}: X of {str(owner.path)!r} has encoding {encoding!r}; expected a "
                                 "dense array or a CSR matrix.", params=(owner.what,))
            self._ds, self.format = sparse_dataset(elem), "csr"
            self.shape, self.dtype = tuple(int(n) for n in self._ds.shape), elem["data"].dtype
        self.chunk_size = int(chunk_size) if chunk_size else chunk_rows(self.shape[1])
        if self.chunk_size < 1:
            raise InputError(f"chunk_size must be a positive number of rows, got {chunk_size!r}.",
                             params=("chunk_size",))
        self.stats: ValueStats | None = None  # filled by the first full scan (value_stats)

    def __repr__(self) -> str:
        return f"DiskMatrix({self.shape[0]} x {self.shape[1]}, {self.format} {self.dtype})"

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return self.rows(start, max(start, stop))
        if isinstance(key, np.ndarray | list) and np.asarray(key).dtype.kind in "iu":
            return self.take(np.asarray(key))
        raise TypeError("an on-disk X is read by row ranges (X[a:b]) or row index arrays (X[[i, j]]); "
                        f"got {key!r}")

    def _block(self, key):
        block = self._ds[key]
        if self.format == "csr":
            return sp.csr_matrix(block)
        return np.asarray(block)

    def select(self, index) -> DiskMatrix:
        """The matrix of the rows ``index`` (file rows of this matrix, in the order given): a view that reads
        from the same file (nothing is read here)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"row index out of range 0..{self.shape[0] - 1}")
        view = object.__new__(DiskMatrix)
        view.__dict__.update(self.__dict__)
        view.index = index if self.index is None else self.index[index]
        view.shape, view.stats = (int(index.size), self.shape[1]), None
        return view

    def rows(self, start: int, stop: int):
        """Rows ``start`` to ``stop`` (exclusive) in memory."""
        if self.index is not None:
            return self.take(np.arange(start, min(stop, self.shape[0])))
        return self._owner._read(lambda: self._block(slice(start, stop)), f"rows {start}-{stop}")

    def to_memory(self):
        """The whole matrix in memory (read chunk by chunk and stacked): CSR or a numpy array."""
        blocks = [block for _s, _e, block in self.chunks()]
        if self.format == "csr":
            return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix(self.shape, dtype=self.dtype)
        return np.concatenate(blocks) if blocks else np.zeros(self.shape, dtype=self.dtype)

    def value_stats(self) -> ValueStats:
        """:class:`~perturbkit.data.ValueStats` of the values, scanned in row chunks once (then cached)."""
        if self.stats is None:
            scan = _ValueScan(self.dtype)
            if scan.dtype.kind in "fiub":
                for _start, _stop, block in self.chunks():
                    scan.update(block)
            self.stats = scan.result()
        return self.stats

    def take(self, idx) -> Any:
        """The rows ``idx`` (any order, repeats allowed), read once each in increasing order."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"row index out of range 0..{self.shape[0] - 1}")
        if self.index is not None:  # a view: its rows are these rows of the file
            idx = self.index[idx]
        uniq, inverse = np.unique(idx, return_inverse=True)
        if uniq.size == 0:
            block = sp.csr_matrix((0, self.shape[1]), dtype=self.dtype) if self.format == "csr" else \
                np.zeros((0, self.shape[1]), dtype=self.dtype)
        else:
            block = self._owner._read(lambda: self._sorted(uniq), f"{uniq.size} rows from {uniq[0]}")
        return block if np.array_equal(uniq, idx) else block[inverse]

    def _sorted(self, uniq: np.ndarray):
        """The rows ``uniq`` (sorted, distinct): one slice read when they fill at least ``DENSE_SPAN`` of the
        range they span (then subset in memory), else a read of those rows alone."""
        first, span = int(uniq[0]), int(uniq[-1] - uniq[0] + 1)
        if uniq.size < DENSE_SPAN * span:
            return self._block(uniq)
        block = self._block(slice(first, first + span))
        return block if uniq.size == span else block[uniq - first]

    def chunks(self, chunk_size: int | None = None, rows: Iterable[int] | None = None) -> Iterator[tuple]:
        """Iterate over ``X`` in row chunks of ``chunk_size`` rows (default :attr:`chunk_size`).

        Without ``rows``: yields ``(start, stop, block)`` for consecutive ranges. With ``rows`` (row indices in
        any order): yields ``(idx, block)`` for consecutive batches of them, each read in sorted order and
        returned in the order of ``idx``.
        """
        size = int(chunk_size or self.chunk_size)
        if rows is None:
            for start in range(0, self.shape[0], size):
                stop = min(start + size, self.shape[0])
                yield start, stop, self.rows(start, stop)
            return
        rows = np.asarray(rows, dtype=np.int64)
        for i in range(0, len(rows), size):
            idx = rows[i:i + size]
            yield idx, self.take(idx)


# ------------------------------------------------------------------------------------------ validation


# --------------------------------------------------------------------------------- chunked preprocessing


def _log_normalise(block, normalize: bool, target_sum: float):
    """One chunk as the in-memory path makes it: float32, then scanpy's ``normalize_total`` + ``log1p``."""
    import anndata as ad
    import scanpy as sc

    block = block.astype(np.float32)
    if not normalize:
        return block
    a = ad.AnnData(block)
    sc.pp.normalize_total(a, target_sum=target_sum)
    sc.pp.log1p(a)
    return a.X


class _GeneMoments:
    """Per-gene sums of the values and of their squares (float64, the squares taken in float32 as scanpy's
    ``_get_mean_var`` does), over chunks; ``seurat`` takes them of ``expm1`` of the log data."""

    def __init__(self, n_vars: int, flavor: str):
        self.n, self.flavor = 0, flavor
        self.sum = np.zeros(n_vars)
        self.sumsq = np.zeros(n_vars)
        self.lo = np.full(n_vars, np.inf)
        self.hi = np.full(n_vars, -np.inf)

    def update(self, block) -> None:
        x = np.expm1(block) if self.flavor == "seurat" else block
        self.n += block.shape[0]
        if sp.issparse(x):
            x = sp.csr_matrix(x)
            d = x.data
            self.sum += np.bincount(x.indices, weights=d.astype(np.float64), minlength=len(self.sum))
            self.sumsq += np.bincount(x.indices, weights=(d * d).astype(np.float64), minlength=len(self.sum))
            lo = np.asarray(x.min(axis=0).todense()).ravel()
            hi = np.asarray(x.max(axis=0).todense()).ravel()
        else:
            x = np.asarray(x)
            self.sum += x.sum(axis=0, dtype=np.float64)
            self.sumsq += (x * x).sum(axis=0, dtype=np.float64)
            lo, hi = x.min(axis=0), x.max(axis=0)
        np.minimum(self.lo, lo, out=self.lo)
        np.maximum(self.hi, hi, out=self.hi)

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """scanpy's mean and unbiased variance."""
        mean = self.sum / self.n
        var = self.sumsq / self.n - mean**2
        if self.n != 1:
            var *= self.n / (self.n - 1)
        return mean, var

    def n_varying(self) -> int:
        return int((self.hi > self.lo).sum())


def hvg_table(mean: np.ndarray, var: np.ndarray, flavor: str, index: pd.Index | None = None,
              n_bins: int = N_BINS) -> pd.DataFrame:
    """scanpy's ``highly_variable_genes`` table (``means``, ``dispersions``, ``dispersions_norm``) from the
    per-gene mean and variance, for the ``seurat`` flavour (mean and variance of ``expm1`` of the log data) and
    ``cell_ranger`` (of the data as given); without the ``highly_variable`` column, which
    :func:`perturbkit.data._top_variable` sets from ``dispersions_norm``."""
    mean, var = np.array(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        if flavor == "seurat":
            dispersion[dispersion == 0] = np.nan
            dispersion = np.log(dispersion)
            mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    if flavor == "seurat":
        bins = n_bins
    elif flavor == "cell_ranger":
        bins = np.r_[-np.inf, np.percentile(mean, np.arange(10, 105, 5)), np.inf]
    else:
        raise InputError(f"hvg_flavor {flavor!r} cannot be computed in chunks; use one of "
                         f"{', '.join(map(repr, HVG_FLAVORS))}, or preprocess in memory.", params=("hvg_flavor",))
    df["mean_bin"] = pd.cut(df["means"], bins=bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    if flavor == "seurat":
        stats = grouped.agg(avg="mean", dev="std")
        single = stats["dev"].isnull()  # one gene in its bin: normalised dispersion 1, as scanpy sets it
        stats.loc[single, "dev"] = stats.loc[single, "avg"]
        stats.loc[single, "avg"] = 0
    else:
        def mad(a):  # statsmodels.robust.mad, as scanpy uses it: median absolute deviation / 0.6745
            a = np.asarray(a, dtype=np.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.median(np.abs(a - np.median(a))) / 0.6744897501960817
        stats = grouped.agg(avg="median", dev=mad)
    per_gene = stats.loc[df["mean_bin"]].set_index(df.index)
    # float32, as scanpy stores it in var (and so as perturbkit.data._top_variable ranks it)
    df["dispersions_norm"] = ((df["dispersions"] - per_gene["avg"]) / per_gene["dev"]).astype(np.float32)
    df = df.drop(columns="mean_bin")
    if index is not None:
        df.index = index
    return df


def _write_csr_header(fh, obs: pd.DataFrame, var: pd.DataFrame, uns: dict, n_vars: int, dense: bool = False):
    """Start an .h5ad in the open h5py file ``fh``: obs, var, uns and an empty, growable CSR X (int64 indptr);
    ``dense``: a float32 X of ``len(obs)`` rows, to be filled."""
    from anndata.io import sparse_dataset, write_elem

    if dense:
        rows = max(1, min(len(obs), (8 << 20) // (4 * max(n_vars, 1))))  # chunks of about 8 MiB of rows
        X = fh.create_dataset("X", shape=(len(obs), n_vars), dtype="float32",
                              chunks=(rows, max(n_vars, 1)) if len(obs) and n_vars else None)
        X.attrs["encoding-type"], X.attrs["encoding-version"] = "array", "0.2.0"
    else:
        empty = sp.csr_matrix((0, n_vars), dtype=np.float32)
        empty.indptr = empty.indptr.astype(np.int64)
        write_elem(fh, "X", empty, dataset_kwargs={"chunks": (1 << 16,)})
    write_elem(fh, "obs", obs)
    write_elem(fh, "var", var)
    write_elem(fh, "uns", uns)
    for name in ("obsm", "varm", "obsp", "varp", "layers"):
        write_elem(fh, name, {})
    fh.attrs["encoding-type"], fh.attrs["encoding-version"] = "anndata", "0.1.0"
    return fh["X"] if dense else sparse_dataset(fh["X"])


def write_h5ad_chunks(path: str | os.PathLike, obs: pd.DataFrame, var: pd.DataFrame, blocks: Iterable,
                      uns: dict | None = None, *, dense: bool = False, atomic: bool = True) -> Path:
    """Write an .h5ad whose X (CSR, float32; ``dense``: a dense float32 array) is written block by block from
    ``blocks`` (sparse or dense row blocks, ``var``'s width, ``obs``'s rows in all), so no more than one block is
    in memory. Atomic (a temporary name renamed at the end) unless ``atomic=False``: then ``path`` is the
    caller's temporary file. For synthetic data of any size, the cache of :func:`preprocess_to_disk` and the
    predictions of ``perturbkit predict`` (dense)."""
    import h5py

    from . import _io

    path = Path(path)
    with (_io.atomic_path(path) if atomic else contextlib.nullcontext(path)) as tmp, h5py.File(tmp, "w") as fh:
        X = _write_csr_header(fh, obs, var, uns or {}, len(var), dense=dense)
        n = 0
        for block in blocks:
            if dense:
                block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float32)
                if n + block.shape[0] > len(obs):
                    raise ValueError(f"write_h5ad_chunks: the blocks hold more rows than obs ({len(obs)})")
                X[n:n + block.shape[0]] = block
            else:
                block = sp.csr_matrix(block, dtype=np.float32)
                X.append(block)
            n += block.shape[0]
        if n != len(obs):
            raise ValueError(f"write_h5ad_chunks: the blocks hold {n} rows, obs {len(obs)}")
    return path


def _plan(src: OnDisk, pp) -> tuple[bool, bool]:
    """(looks like counts, normalise) from the first rows, as the in-memory path decides."""
    from .data import looks_like_counts

    with np.errstate(invalid="ignore"):  # NaN in these rows: the checks of the first pass name them
        counts = looks_like_counts(src.X.rows(0, min(COUNTS_ROWS, src.n_obs)))
    return counts, counts if pp.normalize == "auto" else bool(pp.normalize)


def preprocess_to_disk(src: OnDisk | str | os.PathLike, pp=None, path: str | os.PathLike | None = None, *,
                       spec=None, holdout: str | None = None, log=print) -> tuple[OnDisk, dict]:
    """:func:`perturbkit.data.preprocess` out of core: the preprocessed data written to ``path`` (an .h5ad with a
    CSR X of the selected genes, float32) and opened from there; returns ``(OnDisk, info)``.

    Two passes over ``src`` in row chunks: the first checks the values (:func:`perturbkit.data.check_matrix`'s
    verdicts and messages) and sums, per gene, the log-normalised values and their squares; the genes are then
    chosen as the in-memory path chooses them; the second pass normalises each chunk again and appends its
    selected genes to a temporary file, renamed onto ``path`` when complete. The same warnings and ``info`` as
    :func:`~perturbkit.data.preprocess`; ``obs``, ``var`` (with scanpy's HVG columns) and ``uns`` are kept,
    ``layers``, ``obsm`` and the like are not. The input's X may be dense or CSR; the output's is CSR. With
    ``spec``, the input is checked by :func:`perturbkit.data.validate` (with ``holdout``; from the first pass's
    values, so after one read of the file).
    """
    from .data import _top_variable, check_matrix, validate
    from .spec import Preprocessing

    pp = Preprocessing() if pp is None else pp
    if path is None:
        raise InputError("preprocess_to_disk: give the path of the preprocessed file to write.", params=("path",))
    own = not isinstance(src, OnDisk)
    src = OnDisk(src) if own else src
    try:
        if not isinstance(pp, Preprocessing):
            raise InputError(f"pp must be a Preprocessing, got {type(pp).__name__}.")
        pp.check()
        n_top = pp.n_top_genes
        select = bool(n_top and n_top < src.n_vars)
        if select and pp.hvg_flavor not in HVG_FLAVORS:
            raise InputError(f"hvg_flavor {pp.hvg_flavor!r} cannot be computed in chunks; use one of "
                             f"{', '.join(map(repr, HVG_FLAVORS))}, or preprocess in memory.",
                             params=("hvg_flavor",))
        counts, normalize = _plan(src, pp) if src.n_obs and src.n_vars else (False, False)

        # pass 1: the checks' values and the per-gene sums
        scan = _ValueScan(src.X.dtype)
        moments = _GeneMoments(src.n_vars, pp.hvg_flavor) if select else None
        if src.n_obs and src.n_vars and scan.dtype.kind in "fiub":
            for _start, _stop, block in src.X.chunks():
                scan.update(block)
                if moments is not None and not scan.bad:
                    with np.errstate(all="ignore"), warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # scanpy's per-chunk notes; the checks report once
                        moments.update(_log_normalise(block, normalize, pp.target_sum))
        src.X.stats = scan.result()
        # the in-memory verdicts, from the values just scanned (no second scan)
        if spec is not None:
            validate(src, spec, holdout=holdout)
        else:
            check_matrix(src)
        vmax = src.X.stats.max or 0.0
        if vmax == 0:
            raise InputError(
                f"data: X is all zeros ({src.n_obs} cells x {src.n_vars} genes); there is no expression to learn "
                "from. Check that the right matrix (X, not an empty layer) was saved.")
        notices = _notices(counts, normalize, pp, vmax)
        for note in notices:
            warnings.warn(InputWarning(note, params=("normalize",)), stacklevel=2)

        steps: list[str] = []
        if normalize:
            steps += [f"normalize_total(target_sum={pp.target_sum:g})", "log1p"]
        var = src.var.copy()
        if select:
            mean, variance = moments.mean_var()
            try:
                table = hvg_table(mean, variance, pp.hvg_flavor, index=src.var_names)
                if table["dispersions_norm"].isna().all():  # where scanpy's ranking fails (IndexError)
                    raise ValueError("no gene has a normalised dispersion")
            except InputError:
                raise
            except Exception as exc:
                raise InputError(
                    f"n_top_genes {n_top}: selecting highly variable genes failed ({type(exc).__name__}: {exc}); "
                    f"only {moments.n_varying()} of {src.n_vars} genes vary across cells. Pass n_top_genes=0 "
                    "to keep all genes, or check that X holds the expression matrix you meant.",
                    params=("n_top_genes",)) from None
            genes = _top_variable(table, n_top)
            if len(genes) == 0:
                raise InputError(f"n_top_genes {n_top}: no gene was selected as highly variable; pass "
                                 "n_top_genes=0 to keep all genes.", params=("n_top_genes",))
            var = var.iloc[genes].copy()
            var["highly_variable"] = True
            for col in ("means", "dispersions", "dispersions_norm"):
                var[col] = table[col].to_numpy()[genes]
            steps.append(f"highly_variable_genes(n_top_genes={n_top}, flavor={pp.hvg_flavor!r})")
        else:
            genes = None
            if n_top and n_top > src.n_vars:
                steps.append(f"kept all {src.n_vars} genes (fewer than n_top_genes={n_top})")

        info = {"input": "raw counts" if counts else "log-normalised",
                "steps": steps or ["none: input used as is"], "n_cells": int(src.n_obs),
                "n_genes": int(len(var)), "warnings": notices}
        uns = dict(src.uns)
        if normalize:
            uns["log1p"] = {"base": None}
        if select:
            uns["hvg"] = {"flavor": pp.hvg_flavor}
        uns[K.UNS_PREPROCESS] = {"input": info["input"], "steps": list(info["steps"])}

        # pass 2: normalise again, keep the selected genes, append
        def blocks():
            for _start, _stop, block in src.X.chunks():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # scanpy's per-chunk notes were raised (or not) in pass 1
                    out = _log_normalise(block, normalize, pp.target_sum)
                yield out if genes is None else out[:, genes]

        write_h5ad_chunks(path, src.obs, var, blocks(), uns=uns)
        src._check_unchanged(" (after the last chunk)")
    except BaseException:
        if own:
            src.close()
        raise
    if own:
        src.close()
    log(f"preprocessing: input detected as {info['input']}; {'; '.join(info['steps'])}; "
        f"{info['n_cells']} cells x {info['n_genes']} genes (out of core, written to {path})")
    return OnDisk(path), info


def cache_key(digest: str, preprocessing, spec=None, filter: dict | None = None) -> str:
    """The 16 hex digits that name one preprocessed file per input (its sha256) and settings: the key of the
    bench data cache (``DIR/.cache/data-<key>.h5ad``)."""
    import hashlib

    from ._io import plain

    key: dict[str, Any] = {"sha256": digest, "preprocessing": plain(preprocessing)}
    if spec is not None:
        key["spec"] = spec.to_dict()
    if filter:
        key["filter"] = plain(filter)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def preprocessed(path: str | os.PathLike, pp=None, cache_dir: str | os.PathLike | None = None, *, spec=None,
                 holdout: str | None = None, log=print) -> tuple[OnDisk, dict]:
    """The preprocessed data of the .h5ad ``path``, from ``cache_dir/data-<key>.h5ad`` (:func:`cache_key`: the
    file's sha256, ``pp`` and ``spec``), made by :func:`preprocess_to_disk` when missing; returns ``(OnDisk of
    the cache, info)``; ``info`` also names the ``cache`` file and the input's ``sha256``. With ``spec`` (and
    ``holdout``), the input is checked by :func:`perturbkit.data.validate` (obs in memory, X in chunks), or the
    cached file when there is one."""
    from .data import sha256, validate
    from .spec import Preprocessing

    pp = Preprocessing() if pp is None else pp
    if cache_dir is None:
        raise InputError("preprocessed: give cache_dir, the folder of the preprocessed files.", params=("cache_dir",))
    with OnDisk(path) as src:
        digest = sha256(src.path)
        src._check_unchanged(" (while its sha256 was computed)")
        target = Path(cache_dir) / f"data-{cache_key(digest, pp, spec)}.h5ad"
        if target.exists():
            try:
                out = OnDisk(target, "cache")
            except InputError as exc:
                raise InputError(f"{exc} It is a cached file: delete it and rerun (it is rebuilt from the "
                                 "input).") from None
            try:
                if spec is not None:
                    validate(out, spec, holdout=holdout)
                done = out.uns.get(K.UNS_PREPROCESS, {})
            except BaseException:
                out.close()
                raise
            log(f"preprocessing: read from the cache {target}")
            return out, {"input": done.get("input"), "steps": [str(s) for s in done.get("steps", [])],
                         "n_cells": out.n_obs, "n_genes": out.n_vars, "warnings": [], "cache": str(target),
                         "sha256": digest}
        od, info = preprocess_to_disk(src, pp, target, spec=spec, holdout=holdout, log=log)
    return od, {**info, "cache": str(target), "sha256": digest}
