"""The benchmark scenarios: each ``[scenarios.NAME]`` table of a bench config names one of :data:`SCENARIOS`.

A scenario module holds everything specific to it: its table's dataclass, which held-out tasks it plans, how a
task's cells are split, which cells keep their predictions or DEGs, and the tables and figures it adds at
aggregation (see :class:`~perturbkit.scenarios._base.Scenario`). The harness (:mod:`perturbkit.bench`) and the
report iterate this registry; adding a scenario is one new module and one line here.
"""

from __future__ import annotations

from ._base import (Aggregation, Contexts, Scenario, SplitDef, Table, choose_contexts, context_counts, slug,
                    unique_slugs)
from .cross_donor import CrossDonor, CrossDonorConfig
from .loco import Loco, LocoConfig
from .unbalanced import Unbalanced, UnbalancedConfig

#: ``[scenarios.NAME]`` -> its scenario, in planning order (a scenario may use the tasks of those before it)
SCENARIOS: dict[str, type[Scenario]] = {"loco": Loco, "unbalanced": Unbalanced, "cross_donor": CrossDonor}

__all__ = ["SCENARIOS", "Aggregation", "Contexts", "CrossDonor", "CrossDonorConfig", "Loco", "LocoConfig",
           "Scenario", "SplitDef", "Table", "Unbalanced", "UnbalancedConfig", "choose_contexts",
           "context_counts", "slug", "unique_slugs"]
