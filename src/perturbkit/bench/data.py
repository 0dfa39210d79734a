"""What the cells of one run share: the preprocessed data, made once and cached in ``DIR/.cache``, and the
splits of the tasks (made by each task's scenario)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import BenchConfig
from .rundir import CACHE_DIR


class Context:
    """The preprocessed input of a run directory and the splits of its tasks.

    The preprocessed AnnData is written to ``DIR/.cache/data-<key>.h5ad`` (key: the input's sha256, the
    preprocessing settings, the spec and ``data.filter``) by the first process that needs it and read back by
    every cell, so
    cells run in one process or as separate jobs see byte-identical input. With ``out=None`` (listing the
    cells of a config without a run directory) nothing is cached.
    """

    def __init__(self, cfg: BenchConfig, out: str | Path | None, *, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(out) if out is not None else None
        self.spec = cfg.data.spec
        self._data = None
        self._digest: str | None = None
        self._splits: dict[tuple[str, str], Any] = {}
        self._execution = None

    def perturbations(self) -> list[str]:
        """The run's perturbation labels (``data.perturbed`` resolved against the data; one for two conditions)."""
        return self.spec.perturbations(self.data())

    @property
    def execution(self):
        """The execution context of ``[training]`` (device, threads), resolved once per process."""
        if self._execution is None:
            self._execution = self.cfg.training.execution()
        return self._execution

    @property
    def digest(self) -> str:
        """The input's sha256 (a registered dataset's is pinned or recorded at its fetch; a file's is computed
        once)."""
        from ..config import SYNTHETIC_SOURCES
        from ..data import DATASETS, dataset_sha256, sha256

        if self._digest is None:
            src = self.cfg.data.source
            if src in SYNTHETIC_SOURCES:
                self._digest = self.cfg.data.load()[1]
            elif src in DATASETS:
                self._digest = dataset_sha256(src)  # pinned (bundled) or recorded at the first fetch
            else:
                if not Path(src).exists():
                    from ..data import load_any

                    load_any(src)  # raises the InputError that names the problem
                self._digest = sha256(Path(src))
        return self._digest

    def cache_file(self) -> Path | None:
        """Where the preprocessed data is cached (None without a run directory); the key is
        :func:`perturbkit.ondisk.cache_key`, which names the out-of-core cache too."""
        from ..ondisk import cache_key

        if self.out is None:
            return None
        key = cache_key(self.digest, self.cfg.preprocessing, self.spec, self.cfg.data.filter)
        return self.out / CACHE_DIR / f"data-{key}.h5ad"

    def _preprocessed(self):
        from .. import data

        raw, digest, _desc = self.cfg.data.load()
        if digest != self.digest:
            raise InputError(f"data.source {self.cfg.data.source!r} changed while the run was planned "
                             f"(sha256 {digest[:12]}..., expected {self.digest[:12]}...).")
        data.validate(raw, self.spec)
        pp, info = data.preprocess(raw, self.cfg.preprocessing, log=self.log)
        pp.uns["perturbkit_bench_preprocessing"] = json.dumps(info)
        return pp

    def data(self):
        """The preprocessed AnnData (shared; never modified)."""
        if self._data is None:
            path = self.cache_file()
            if path is None:
                self._data = self._preprocessed()
                return self._data
            import anndata as ad

            from .. import _io

            if not path.exists():
                pp = self._preprocessed()
                _io.atomic_write_with(path, lambda p: pp.write_h5ad(p))
            try:
                self._data = ad.read_h5ad(path)
            except Exception as exc:  # a corrupt cache (disk full, foreign file): say how to recover
                raise InputError(f"cannot read the cached preprocessed data {str(path)!r} ({exc}); delete it "
                                 "and rerun (it is rebuilt from the input).") from None
        return self._data

    def planning_data(self):
        """The data to plan with: the preprocessed data when at hand, else the input (obs is the same)."""
        path = self.cache_file()
        if self._data is not None or (path is not None and path.exists()):
            return self.data()
        from ..data import validate

        adata, _digest, _desc = self.cfg.data.load()
        validate(adata, self.spec)
        return adata

    def preprocessing_info(self) -> dict[str, Any]:
        """What preprocessing did (as recorded in the cached data)."""
        return json.loads(self.data().uns.get("perturbkit_bench_preprocessing", "{}"))

    def split(self, sd):
        """The :class:`perturbkit.split.Split` of a task (a :class:`~perturbkit.scenarios.SplitDef`), as
        indices into :meth:`data`; made by the task's scenario from the cells of its ``filter``."""
        from ..scenarios import SCENARIOS, filtered_rows
        from ..split import Split

        key = (sd.scenario, sd.key)
        if key not in self._splits:
            scenario = SCENARIOS[sd.scenario]
            adata = scenario.task_data(sd, self)
            where = scenario.cells_filter(self.cfg.scenarios[sd.scenario])
            if not where:
                self._splits[key] = scenario.split(sd, adata, self.spec)
            else:
                rows = filtered_rows(adata, where, f"scenarios.{sd.scenario}.filter")
                s = scenario.split(sd, adata[rows], self.spec)
                self._splits[key] = Split(train=rows[s.train], source=rows[s.source], target=rows[s.target],
                                          name=s.name, info={**s.info, "filter": where,
                                                             "n_cells_filtered": int(len(rows))})
        return self._splits[key]
