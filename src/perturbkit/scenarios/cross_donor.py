"""``[scenarios.cross_donor]``: train on some donors, predict a context's perturbed cells in the others
(scGen's cross-study task): the donors are dealt into seeded folds, or the test groups are listed."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import positive
from ..errors import InputError
from ._base import (Contexts, Scenario, SplitDef, choose_contexts, context_counts, require_donor_key,
                    unique_slugs)


@dataclass(frozen=True)
class CrossDonorConfig:
    """``[scenarios.cross_donor]``: train on some donors, predict a context's perturbed cells in others."""

    contexts: Contexts = "all"
    folds: int = 2  # donors dealt into this many seeded groups; each group is the test donors once
    test_donors: tuple[tuple[str, ...], ...] = ()  # explicit test groups instead of folds
    donor_seed: int = 0
    context_seen: bool = True  # False: the training donors' perturbed cells of the context are left out too
    test_controls_in_train: bool = True  # the test donors' control cells are training cells (as in scGen)
    min_cells: int = 10  # per condition in the test donors' context

    def __post_init__(self):
        positive("scenarios.cross_donor.min_cells", self.min_cells, 3)
        positive("scenarios.cross_donor.folds", self.folds, 2)


class CrossDonor(Scenario):
    """Predict held-out donors."""

    name = "cross_donor"
    Config = CrossDonorConfig

    @classmethod
    def check(cls, conf: CrossDonorConfig, cfg) -> None:
        require_donor_key(cfg, cls.name, " (or batch).")

    @classmethod
    def plan(cls, conf: CrossDonorConfig, cfg, adata, before: list[SplitDef]) -> list[SplitDef]:
        from ..split import donor_folds

        spec = cfg.data.spec
        contexts = choose_contexts(conf.contexts, context_counts(adata, spec), spec, conf.min_cells,
                                   f"scenarios.{cls.name}")
        if conf.test_donors:
            groups = [tuple(str(d) for d in g) for g in conf.test_donors]
        else:
            groups = donor_folds(adata, spec, conf.folds, seed=conf.donor_seed)
        keys = unique_slugs(contexts)
        in_test = [context_counts(adata, spec, donors=group).min(axis=1) for group in groups]
        out = []
        for c in contexts:
            for k, group in enumerate(groups):
                if in_test[k][c] < conf.min_cells:
                    continue  # too few cells of this context in these donors: no such split
                params = {"test_donors": list(group), "context_seen": conf.context_seen,
                          "test_controls_in_train": conf.test_controls_in_train}
                out.append(SplitDef(cls.name, f"{keys[c]}_f{k}", f"{c} | test donors {'+'.join(group)}", c,
                                    f"fold{k}", params))
        if not out:
            raise InputError(f"scenarios.cross_donor: no context has >= {conf.min_cells} cells of each "
                             "condition in the test donors of any fold; lower "
                             "scenarios.cross_donor.min_cells or use fewer folds.")
        return out

    @classmethod
    def split(cls, sd: SplitDef, adata, spec):
        from ..split import cross_donor

        p = sd.params
        return cross_donor(adata, spec, sd.context, p["test_donors"], context_seen=p["context_seen"],
                           test_controls_in_train=p["test_controls_in_train"])
