"""`nmm validate` and `nmm run` on malformed pipelines: exit 2, the field path, no traceback,
nothing written. `nmm run` runs as the installed command in its own process (with a timeout: a
hostile document must not hang it); `nmm validate` runs the same CLI app in this process, which
saves a Python start-up per bad spec (114 of them took 43 s as processes)."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import NMM
from tests.unit.test_spec import BAD, expected


def nmm(args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NMM_HOME", "NMM_STORE")}
    return subprocess.run([NMM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def nmm_here(args, cwd: Path, monkeypatch) -> subprocess.CompletedProcess:
    """The CLI app run in this process, in `cwd`: its exit code, stdout and stderr."""
    from typer.testing import CliRunner

    from nmm.cli import app

    monkeypatch.chdir(cwd)
    r = CliRunner(env={"MLFLOW_TRACKING_URI": None, "NMM_HOME": None, "NMM_STORE": None}).invoke(app, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no escaped exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_pipeline_exits_2_with_field_path_and_writes_nothing(path, command, tmp_path, monkeypatch):
    before = sorted(tmp_path.rglob("*"))
    r = (
        nmm_here([command, str(path)], tmp_path, monkeypatch)
        if command == "validate"
        else nmm([command, str(path)], tmp_path)
    )
    assert r.returncode == 2, r.stderr
    assert expected(path) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert sorted(tmp_path.rglob("*")) == before  # no .nmm, no runs, no store


def test_missing_file_is_a_clear_error(tmp_path):
    r = nmm(["validate", str(tmp_path / "nope.yaml")], tmp_path)
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_valid_pipeline_validates(tmp_path):
    r = nmm(["validate", str(Path(__file__).parents[2] / "workflows" / "quickstart.yaml")], tmp_path)
    assert r.returncode == 0 and "valid NMMPipeline 'quickstart'" in r.stdout


def test_compile_rejects_a_model_too_big_for_its_gpu_with_exit_2(tmp_path):
    import yaml

    doc = yaml.safe_load((Path(__file__).parents[2] / "workflows" / "quickstart.yaml").read_text())
    doc["spec"]["training"]["resources"] = {"gpusPerNode": 1, "gpuMemoryGiB": 24}
    doc["spec"]["model"]["size"] = {"dim": 8192, "layers": 64, "heads": 64}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = nmm(["compile", str(path)], tmp_path)
    assert r.returncode == 2 and "does not fit a 24 GiB GPU" in r.stderr and "Traceback" not in r.stderr
