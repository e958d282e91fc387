"""Hydra entry point of the paper's inference: A and B ensembles, merge, evaluation (``make ensemble``).

    python ensemble.py runs=outputs/demo dataset=data/synthetic oof=true
    python ensemble.py model=model.zip dataset=/path/to/cases      # from a model package

See ``conf/ensemble.yaml`` for every option and :mod:`brats_lightning.inference.ensemble` for the steps.
"""

from __future__ import annotations

import sys

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


def package_override(argv: list[str]) -> list[str]:
    """``model=PATH.zip`` names a model package: passed on as ``package=PATH.zip``, since Hydra reads
    ``model=...`` as a choice of the training config group conf/model/ (``make ensemble ARGS=model=...``)."""
    return [f"package={arg[len('model='):]}" if arg.startswith("model=") and arg.endswith(".zip") else arg
            for arg in argv]


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *package_override(sys.argv[1:])]
    main()
