"""Hydra entry point of the paper's inference: A and B ensembles, merge, evaluation (``make ensemble``).

    python ensemble.py runs=outputs/demo dataset=data/synthetic oof=true

See ``conf/ensemble.yaml`` for every option and :mod:`brats_lightning.inference.ensemble` for the steps.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from brats_lightning.inference.ensemble import register_resolvers, run_ensemble

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="ensemble")
def main(cfg: DictConfig) -> float | None:
    """Run the ensemble; returns the merged (else A's) mean Dice for sweeps, None without labels."""
    report = run_ensemble(cfg)
    results = report["results"]
    best = results.get("merged") or next(iter(results.values()), None)
    if not best:
        return None
    return sum(best[f"dice_{r}"] for r in ("et", "tc", "wt")) / 3


if __name__ == "__main__":
    main()
