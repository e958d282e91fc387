"""The repository keeps its own house rules: one module per name, imports only down the layers, and every
file or doc section that code and docs point at exists in the clone."""

from __future__ import annotations

import ast
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "brats_lightning"

# Layers, lowest first: a module may import modules of its own layer or of lower ones, never higher ones.
LAYERS: dict[str, int] = {
    # 0: building blocks that know no files
    "errors": 0, "precision": 0, "distributed": 0, "speed": 0, "metrics": 0, "lesionwise": 0, "losses": 0,
    "optim": 0, "models": 0, "data.labels": 0, "data.datasets": 0, "data.normalize": 0, "data.augment": 0,
    "inference.tta": 0, "inference.uncertainty": 0,
    # 1: data sets on disk
    "data": 1,
    # 2: the suite's own files
    "predictions": 2, "runs": 2, "plots": 2, "checkpointing": 2, "locks": 2,
    # 3: training, scoring, inference
    "module": 3, "callbacks": 3, "evaluate": 3, "reports": 3, "memory": 3, "progress": 3, "package": 3,
    "inference": 3, "inference.merge": 3, "inference.postprocess": 3, "inference.predictor": 3,
    # 4: orchestration
    "inference.ensemble": 4, "cli": 4,
}


def _layer(module: str) -> int:
    """The layer of ``brats_lightning.<module>``: the longest matching key of LAYERS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"brats_lightning.{module} has no layer: add it to LAYERS in {Path(__file__).name}")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _tracked(*suffixes: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [REPO / p for p in out if p.endswith(suffixes) and (REPO / p).is_file()]


def test_no_module_name_appears_twice():
    names = Counter(path.stem for path in PACKAGE.rglob("*.py") if path.stem != "__init__")
    assert [name for name, count in names.items() if count > 1] == []


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, path in _modules().items():
        layer = _layer(module)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target.startswith("brats_lightning."):
                    imported = target[len("brats_lightning."):]
                    if _layer(imported) > layer:
                        wrong.append(f"{module} ({layer}) imports {imported} ({_layer(imported)})")
    assert wrong == []


def test_the_layer_rule_catches_an_upward_import():
    assert _layer("evaluate") > _layer("data.layout")
    assert _layer("inference.ensemble") > _layer("evaluate") > _layer("predictions")
    with pytest.raises(AssertionError, match="has no layer"):
        _layer("nonexistent_module")


PATH_RE = re.compile(r"(?<![\w/.-])((?:docs|brats_lightning|conf|benchmarks|experiments|tests)/[\w/.-]*\w"
                     r"\.(?:md|py|yaml|png|json))")
SECTION_RE = re.compile(r"docs/(method|contracts)\.md,?\s+\"([^\"]+)\"")


def test_every_file_named_in_code_and_docs_exists():
    missing = []
    for path in _tracked(".py", ".md", ".yaml", ".cfg") + [REPO / "Makefile"]:
        text = path.read_text()
        for match in PATH_RE.finditer(text):
            named = match.group(1)
            if not (REPO / named).exists() and not (path.parent / named).exists():
                missing.append(f"{path.relative_to(REPO)} names {named}")
    assert missing == []


def test_no_citation_of_files_outside_the_repository():
    pattern = re.compile(r"\b(SPEC|DESIGN|CONTRACTS)\.md")
    outside = [str(p.relative_to(REPO)) for p in _tracked(".py", ".md", ".yaml")
               if pattern.search(p.read_text()) and p.name != Path(__file__).name]
    assert outside == []


def test_every_cited_doc_section_exists():
    headings = {doc: {line[3:].strip() for line in (REPO / "docs" / f"{doc}.md").read_text().splitlines()
                      if line.startswith("## ")} for doc in ("method", "contracts")}
    missing = []
    for path in _tracked(".py", ".md", ".yaml"):
        for doc, section in SECTION_RE.findall(path.read_text()):
            section = " ".join(section.split())
            if section not in headings[doc]:
                missing.append(f"{path.relative_to(REPO)} cites docs/{doc}.md \"{section}\"")
    assert missing == []
