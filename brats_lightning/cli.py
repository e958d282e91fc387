"""The `brats-lightning` command: one entry point, one subcommand per task.

Each subcommand lives in the module that owns its work; that module (or the object named after
``module:`` in COMMANDS) defines ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
Only the chosen subcommand's module is imported, so `brats-lightning merge --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from brats_lightning.errors import EXIT_USER_ERROR, UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("brats_lightning.data.synthetic", "write a synthetic BraTS-like data set on MNI152 anatomy"),
    "check-data": ("brats_lightning.data.checks", "scan a data set and report every problem (exit 1 if any)"),
    "preprocess": ("brats_lightning.data.preprocess",
                   "build the preprocessed cache of a data set for a pipeline"),
    "predict": ("brats_lightning.inference.predictor", "ensemble trained runs with TTA and write label maps"),
    "merge": ("brats_lightning.inference.merge",
              "merge pipeline A and pipeline B label maps (paper Table 1)"),
    "evaluate": ("brats_lightning.evaluate",
                 "score label maps against ground truth (BraTS 2020 or 2023 lesion-wise rules)"),
    "cv-report": ("brats_lightning.reports",
                  "cross-validation table (paper Table 2) from run.json files and oof scores"),
    "flag-cases": ("brats_lightning.callbacks.case_losses",
                   "turn recorded per-case losses into an exclusion list"),
    "export": ("brats_lightning.package:EXPORT_COMMAND",
               "package trained ensembles as one portable, pickle-free model.zip"),
    "model-info": ("brats_lightning.package:INFO_COMMAND", "verify a model package and print its card"),
}


def _top_level_help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: brats-lightning COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `brats-lightning COMMAND --help` for a command's options.",
              "Training is `python train.py` (Hydra); see the README."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand named by the first argument."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"brats-lightning: unknown command {name!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    module_name, summary = COMMANDS[name]
    module_name, _, attribute = module_name.partition(":")  # "module:OBJECT" when a module has two commands
    module = importlib.import_module(module_name)
    module = getattr(module, attribute) if attribute else module
    parser = argparse.ArgumentParser(prog=f"brats-lightning {name}", description=summary)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except UserError as err:  # bad input: one message, no traceback (brats_lightning/errors.py)
        print(f"brats-lightning {name}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
