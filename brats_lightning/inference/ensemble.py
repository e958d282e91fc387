"""The full inference of the paper (section 2.6): pipeline A ensemble, pipeline B ensemble, merge, evaluate.

Driven by ``python ensemble.py`` (Hydra, ``conf/ensemble.yaml``; ``make ensemble``):

1. for each pipeline in ``pipelines`` (A: best two runs per fold, B: all runs), find its runs under ``runs``
   (or take its networks from the model package ``package``, brats_lightning/package.py) and predict every
   case of ``dataset`` with TTA (:class:`~brats_lightning.inference.predictor.Predictor`), out of fold when
   ``oof=true``; label maps and probabilities go to ``<pred_dir>/<pipeline>/``;
2. merge A and B label maps with the docs/method.md table into ``<pred_dir>/merged/``;
3. when the data set has labels, score A, B and merged with
   :func:`brats_lightning.evaluate.evaluate_folder` into ``<eval_dir>/<name>/`` (with ``oof=true`` the
   default ``eval_dir`` is ``<runs>/oof``, where ``brats-lightning cv-report`` finds the rows);
4. print Dice and HD95 per region for A, B and merged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

REGION_KEYS = (("ET", "et"), ("TC", "tc"), ("WT", "wt"))


def _pick(condition: Any, if_true: Any, if_false: Any) -> Any:
    """``${pick:${oof},a,b}``: a when the condition is true (bool or "true"), else b."""
    if isinstance(condition, str):
        condition = condition.strip().lower() in ("true", "1", "yes")
    return if_true if condition else if_false


def register_resolvers() -> None:
    """Register the OmegaConf resolvers ``conf/ensemble.yaml`` uses (``pick``); safe to call twice."""
    if not OmegaConf.has_resolver("pick"):
        OmegaConf.register_new_resolver("pick", _pick)


def _should_evaluate(setting: Any, cases: list) -> bool:
    labeled = bool(cases) and all(case.has_labels for case in cases)
    if setting == "auto":
        return labeled
    if setting and not labeled:
        missing = [case.case_id for case in cases if not case.has_labels][:5]
        raise ValueError(
            f"evaluate=true but cases have no seg file (e.g. {missing}); use evaluate=auto or false")
    return bool(setting)


def means(table) -> dict[str, float]:
    """Mean of each Dice / HD95 column of an evaluate_folder table."""
    keys = [f"{m}_{r}" for m in ("dice", "hd95") for _, r in REGION_KEYS]
    return {key: float(table[key].mean()) for key in keys if key in table}


def results_table(results: dict[str, dict[str, float]]):
    """A rich Table like the paper's Table 3: a row per ensemble (A, B, merged), Dice and HD95 per region."""
    from rich.table import Table

    table = Table(title="Ensemble results (mean over cases; HD95 in mm)")
    table.add_column("ensemble")
    for metric in ("Dice", "HD95"):
        for region, _ in REGION_KEYS:
            table.add_column(f"{metric} {region}", justify="right")
    for name, values in results.items():
        dice = [f"{values.get(f'dice_{key}', float('nan')):.4f}" for _, key in REGION_KEYS]
        hd = [f"{values.get(f'hd95_{key}', float('nan')):.2f}" for _, key in REGION_KEYS]
        table.add_row(name, *dice, *hd)
    return table


def _run_ensembles(runs_dir: Path, pipelines: dict, options: Any) -> dict[str, Any]:
    """Each pipeline's Predictor over its runs under ``runs_dir``, chosen before anything is predicted."""
    from brats_lightning.inference.predictor import Predictor
    from brats_lightning.runs import find_runs, select_runs

    ensembles = {}
    for name, spec in pipelines.items():
        spec = spec or {}
        found = find_runs(runs_dir, pipeline=name, model=spec.get("model"))
        if not found:
            others = sorted({r.pipeline for r in find_runs(runs_dir)})
            raise FileNotFoundError(
                f"ensemble: no pipeline {name} runs (run.json) under {runs_dir} (pipelines found: "
                f"{others or 'none'}); train them, or leave the pipeline out with `~pipelines.{name}`"
            )
        chosen = select_runs(found, spec.get("select", "all"))
        log.info("pipeline %s (%s): %s", name, spec.get("select", "all"), ", ".join(r.name for r in chosen))
        ensembles[name] = Predictor(chosen, options)
    return ensembles


def _package_ensembles(cfg: DictConfig, options: Any, pipelines: dict, cases: list) -> dict[str, Any]:
    """The pipelines of the model package ``cfg.package`` that ``pipelines`` keeps, as Predictors (with the
    package's TTA views and ET threshold; ``runs`` and each pipeline's ``select`` are not read)."""
    from brats_lightning.errors import UserError
    from brats_lightning.inference.predictor import Predictor
    from brats_lightning.package import ModelPackage, package_options

    if cfg.oof:
        raise UserError(f"ensemble: oof=true with package={cfg.package}: a package does not list the cases "
                        "its networks held out; predict out of fold from the training runs (runs=...)")
    package = ModelPackage.open(cfg.package)
    package.check_cases(cases)
    names = [name for name in package.pipelines if name in pipelines]
    if not names:
        raise UserError(f"ensemble: package {cfg.package} holds pipelines {package.pipelines}, none of those "
                        f"asked for ({sorted(pipelines)}): keep one of them in `pipelines`")
    options = package_options(options, package)
    log.info("ensemble: package %s (%s), pipelines %s", cfg.package, package.package_id, names)
    return {name: Predictor.from_package(package, name, options) for name in names}


def run_ensemble(cfg: DictConfig) -> dict[str, Any]:
    """Run the steps of the module docstring with a composed ``conf/ensemble.yaml``.

    Returns:
        ``{"predictions": {name: folder}, "results": {name: mean metrics}, "et_threshold": {...}}``.
    """
    from rich.console import Console

    from brats_lightning.data.layout import find_cases
    from brats_lightning.inference.predictor import PredictOptions
    from brats_lightning.package import predict_pipelines

    runs_dir, data = Path(cfg.runs), Path(cfg.dataset)
    pred_dir, eval_dir = Path(cfg.pred_dir), Path(cfg.eval_dir)
    options = PredictOptions.from_mapping(OmegaConf.to_container(cfg.predict, resolve=True))
    pipelines = OmegaConf.to_container(cfg.pipelines, resolve=True) or {}
    if not pipelines:
        raise ValueError("ensemble: `pipelines` is empty; expected A and/or B (conf/ensemble.yaml)")
    cases = find_cases(data)
    evaluate = _should_evaluate(cfg.evaluate, cases)
    log.info("ensemble: %d case(s) from %s, runs from %s, oof=%s, evaluate=%s", len(cases), data, runs_dir,
             cfg.oof, evaluate)

    if cfg.get("package"):
        ensembles = _package_ensembles(cfg, options, pipelines, cases)
    else:
        ensembles = _run_ensembles(runs_dir, pipelines, options)
    if cfg.oof and cfg.get("oof_cases", "all") == "held_out":  # e.g. a sweep with only some folds trained
        held_out = set.intersection(*({c for r in p.runs for c in r.val_cases} for p in ensembles.values()))
        cases = [c for c in cases if c.case_id in held_out]
        log.info("oof_cases=held_out: %d case(s) held out by every pipeline's runs", len(cases))
    elif cfg.oof:  # oof_cases=all: every case needs a run of each pipeline that held it out
        from brats_lightning.errors import UserError

        for name, predictor in ensembles.items():
            held = {c for r in predictor.runs for c in r.val_cases}
            orphans = sorted(c.case_id for c in cases if c.case_id not in held)
            if orphans:
                raise UserError(
                    f"ensemble oof=true: no pipeline {name} run under {runs_dir} held out {len(orphans)} of "
                    f"the {len(cases)} cases of {data} (e.g. {orphans[:3]}), as when only some folds of a "
                    "sweep are trained; pass oof_cases=held_out to predict and score only the cases the runs "
                    "held out, or train the other folds")
    case_ids = {c.case_id for c in cases}
    folders = predict_pipelines(ensembles, cases, pred_dir, pred_dir / "merged" if cfg.merge else None,
                                oof=bool(cfg.oof))

    report: dict[str, Any] = {"predictions": {k: str(v) for k, v in folders.items()}, "results": {},
                              "et_threshold": {}}
    if evaluate:
        from brats_lightning.evaluate import evaluate_folder

        for name, folder in folders.items():
            table = evaluate_folder(folder, data, eval_dir / name, label=name, workers=int(cfg.eval_workers),
                                    case_ids=case_ids)
            report["results"][name] = means(table)
        if cfg.choose_et_threshold:
            from brats_lightning.inference.postprocess import choose_et_threshold

            if not cfg.oof:
                log.warning("choose_et_threshold on in-sample predictions (oof=false): optimistic choice")
            for name, folder in folders.items():
                choice = choose_et_threshold(folder, data, list(cfg.et_candidates))
                curve = {str(k): v for k, v in choice.mean_dice.items()}
                report["et_threshold"][name] = {"threshold": choice.threshold, "mean_dice_et": curve}
        Console().print(results_table(report["results"]))
        for name, choice in report["et_threshold"].items():
            log.info("ET threshold for %s: %d voxels (use predict.et_threshold=%d)", name,
                     choice["threshold"], choice["threshold"])
    else:
        log.info("no labels in %s: predictions written to %s, nothing scored", data, pred_dir)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "ensemble.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
