"""The benchmark scenarios: each ``[scenarios.NAME]`` table of a bench config names one of :data:`SCENARIOS`.

A scenario module holds everything specific to it: its table's dataclass, which held-out tasks it plans, how a
task's cells are split, which cells keep their predictions or DEGs, and the tables and figures it adds at
aggregation (see :class:`~perturbkit.scenarios._base.Scenario`). The harness (:mod:`perturbkit.bench`) and the
report iterate this registry; adding a scenario is one new module and one line here.
"""

from __future__ import annotations

from ._base import (Aggregation, Contexts, Scenario, SplitDef, Table, choose_contexts, context_counts,
                    filtered_rows, slug, unique_slugs)
from ._screen import ScreenScenario
from .context_transfer import ContextTransfer, ContextTransferConfig
from .cross_donor import CrossDonor, CrossDonorConfig
from .cross_study import CrossStudy, CrossStudyConfig
from .loco import Loco, LocoConfig
from .unbalanced import Unbalanced, UnbalancedConfig
from .unseen_combination import UnseenCombination, UnseenCombinationConfig

#: ``[scenarios.NAME]`` -> its scenario, in planning order (a scenario may use the tasks of those before it)
SCENARIOS: dict[str, type[Scenario]] = {"loco": Loco, "unbalanced": Unbalanced, "cross_donor": CrossDonor,
                                        "context_transfer": ContextTransfer,
                                        "unseen_combination": UnseenCombination, "cross_study": CrossStudy}

__all__ = ["SCENARIOS", "Aggregation", "ContextTransfer", "ContextTransferConfig", "Contexts", "CrossDonor",
           "CrossDonorConfig", "CrossStudy", "CrossStudyConfig", "Loco", "LocoConfig", "Scenario", "ScreenScenario", "SplitDef", "Table",
           "Unbalanced", "UnbalancedConfig", "UnseenCombination", "UnseenCombinationConfig",
           "choose_contexts", "context_counts", "filtered_rows", "slug", "unique_slugs"]
