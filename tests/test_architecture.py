"""The import rules, stated once and checked over every product file with the standard
library's ast, imports inside functions and `if __name__ == "__main__":` blocks included.

Layers, bottom up; imports only go down:
    core     tokenizer.py, model.py, generation.py, token_store.py, data.py: the standard
             library, numpy, torch, and the core files CORE_IMPORTS lists for each
    utils/   the core and utils/
    scripts  train.py, inference.py, export.py, profile_model.py, search.py, bench/, scripts/:
             the core and utils/, never each other
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The core files and the project modules each may import: model.py and tokenizer.py none, so
# each can be copied into another project alone; generation.py travels with model.py.
CORE_IMPORTS: dict[str, frozenset[str]] = {
    "tokenizer": frozenset(),
    "model": frozenset(),
    "generation": frozenset({"model"}),
    "token_store": frozenset({"tokenizer"}),
    "data": frozenset({"tokenizer", "token_store"}),
}
CORE_THIRD_PARTY = frozenset({"numpy", "torch"})
UTILS = "utils"
SCRIPT_FOLDERS = ("bench", "scripts")
TESTS = "tests"
# The layers each layer may import. Tests are no layer of the product: nothing imports them.
MAY_IMPORT = {"core": {"core"}, "utils": {"core", "utils"}, "script": {"core", "utils"}}


def product_files(root: Path) -> list[Path]:
    """Every .py file of the product: the top level, utils/ and the script folders."""
    files = list(root.glob("*.py"))
    for folder in (UTILS, *SCRIPT_FOLDERS):
        files += (root / folder).rglob("*.py")
    return sorted(files)


def layer_of_file(path: Path, root: Path) -> str:
    parts = path.relative_to(root).parts
    if parts[0] == UTILS:
        return "utils"
    if len(parts) == 1 and path.stem in CORE_IMPORTS:
        return "core"
    return "script"


def layer_of_module(module: str, root: Path) -> str | None:
    """The layer of the project module an import names, or None outside the project."""
    top = module.split(".")[0]
    if top in CORE_IMPORTS:
        return "core"
    if top == UTILS:
        return "utils"
    if top == TESTS:
        return "tests"
    if top in SCRIPT_FOLDERS or (root / f"{top}.py").is_file():
        return "script"
    return None


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it stands."""
    package = path.relative_to(root).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
    return found


def violations(root: Path) -> list[str]:
    """Every import that breaks the rules, as `path:line imports module (why)`."""
    found = []
    for path in product_files(root):
        layer = layer_of_file(path, root)
        for line, module in imported_modules(path, root):
            why = broken_rule(path, layer, module, root)
            if why:
                found.append(f"{path.relative_to(root)}:{line} imports {module} ({why})")
    return found


def broken_rule(path: Path, layer: str, module: str, root: Path) -> str | None:
    target = layer_of_module(module, root)
    top = module.split(".")[0]
    if target is None:
        if layer == "core" and top not in sys.stdlib_module_names | CORE_THIRD_PARTY:
            return "the core imports only the standard library, numpy and torch"
        return None
    if target not in MAY_IMPORT[layer]:
        return f"{layer} may import only {' and '.join(sorted(MAY_IMPORT[layer]))}"
    if layer == "core" and top not in CORE_IMPORTS[path.stem]:
        allowed = ", ".join(sorted(CORE_IMPORTS[path.stem])) or "nothing of the project"
        return f"{path.stem} may import {allowed}"
    return None


def project_imports(path: Path, root: Path) -> list[str]:
    return [module for _, module in imported_modules(path, root)
            if layer_of_module(module, root) is not None]


def test_every_import_goes_down_the_layers():
    assert violations(PROJECT_ROOT) == []


@pytest.mark.parametrize("name", ["model", "tokenizer"])
def test_model_and_tokenizer_import_nothing_of_the_project(name):
    assert project_imports(PROJECT_ROOT / f"{name}.py", PROJECT_ROOT) == []


def test_every_core_file_the_rules_name_exists():
    assert all((PROJECT_ROOT / f"{name}.py").is_file() for name in CORE_IMPORTS)


def test_the_check_reports_a_core_file_importing_utils_and_utils_importing_a_script(tmp_path):
    (tmp_path / UTILS).mkdir()
    (tmp_path / "tokenizer.py").write_text("def load():\n    from utils.errors import UserError\n")
    (tmp_path / "train.py").write_text("import tokenizer\nfrom utils import runs\n")
    (tmp_path / UTILS / "errors.py").write_text("class UserError(Exception): ...\n")
    (tmp_path / UTILS / "runs.py").write_text(
        "import json\nfrom . import errors\n\nif __name__ == '__main__':\n    import train\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "generate.py").write_text("import yaml\nfrom inference import main\n")
    (tmp_path / "inference.py").write_text("import model\n")
    (tmp_path / "model.py").write_text("import torch\nimport tqdm\n")
    assert violations(tmp_path) == [
        "bench/generate.py:2 imports inference (script may import only core and utils)",
        "model.py:2 imports tqdm (the core imports only the standard library, numpy and torch)",
        "tokenizer.py:2 imports utils.errors (core may import only core)",
        "utils/runs.py:5 imports train (utils may import only core and utils)",
    ]
