"""The layers of DESIGN.md are import-linter contracts (pyproject.toml, [tool.importlinter]), run
here: and they fail when a forbidden import is added (checked on a copy of the tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT = str(Path(sys.executable).parent / "lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{root / 'platform'}{os.pathsep}{root / 'operators'}")
    return subprocess.run(
        [LINT, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_keeps_every_import_contract():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert ", 0 broken." in r.stdout, r.stdout[-3000:]


@pytest.mark.parametrize(
    "module, line, contract",
    [
        ("platform/nmm/stages/finalize.py", "import nmm.engine.runner", "nmm's layers"),
        ("platform/nmm/train/loss.py", "import pydantic", "the model and the trainer need torch alone"),
        ("platform/nmm/evaluate/grid.py", "import mlflow", "only nmm.lineage talks to MLflow"),
        ("platform/nmm/data/shards.py", "import minio", "only nmm.storage talks to object storage"),
        ("operators/nmm_operator/status.py", "import nmm.stages.train", "the operator reaches no stage"),
        ("platform/nmm/spec/data.py", "import nmm.data.shapes", "the spec knows data source kinds and recipes"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    for part in ("platform", "operators"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    broken = r.stdout.split("Broken contracts")[-1]
    assert contract in broken, r.stdout[-3000:]


def test_no_function_in_train_stages_or_lineage_runs_past_sixty_lines():
    import ast

    long = []
    for pkg in ("train", "stages", "lineage"):
        for path in (ROOT / "platform" / "nmm" / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    long.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                        f"({node.end_lineno - node.lineno + 1} lines)"
                    )
    assert not long, long


def test_every_torch_load_passes_weights_only_s7():
    """A pickle in a checkpoint runs code when loaded; `weights_only=True` refuses it."""
    import ast

    calls = []
    for root in ("platform", "operators", "benchmarks"):
        for path in (ROOT / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    safe = any(
                        k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords
                    )
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert calls, "no torch.load found: the walk is broken"
    assert [where for where, safe in calls if not safe] == []


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing_to_lint_or_reformat(args):
    """`[tool.ruff]` in pyproject.toml: lines of at most 120, imports sorted, bugbear and pyupgrade."""
    ruff = Path(sys.executable).parent / "ruff"
    r = subprocess.run(
        [str(ruff), *args, "platform", "operators", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
