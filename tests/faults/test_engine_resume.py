"""Faults of a local run and its resume (`nmm run --resume`, `nmm retry`), on small Workflows of
`python -c` steps. Each test names the fault, what must hold, and checks it.

The engine keeps its record in `<runs>/<run>/status.json`, rewritten atomically at every
transition; a resume keeps the run's name and UID (where its outputs are filed), reuses the steps
that succeeded (their store folders re-verified) and runs the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from nmm import storage
from nmm.engine import run_workflow
from nmm.engine.runner import NotResumable
from nmm.engine.state import RunBusy, locked, ours
from tests.conftest import wait_for
from tests.integration.test_engine_local import step, workflow

PY = sys.executable


def counting(counter: Path, then: str = "") -> str:
    """Code that appends one line to `counter` (how many times the step ran), then runs `then`."""
    return f"import pathlib,sys; f=open({str(counter)!r},'a'); f.write('x\\n'); f.close()\n{then}"


def pipeline(tmp_path: Path, fail_flag: Path, publish_to: str | None = None) -> dict:
    """a → b → c, and `fin` on exit. `a` counts its runs and outputs `out` (a store folder when
    `publish_to`); `b` fails while `fail_flag` exists; `c` and `fin` count their runs."""
    a_code = counting(
        tmp_path / "a.count",
        "pathlib.Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True); "
        f"pathlib.Path(sys.argv[1]).write_text({(publish_to or 'plain')!r})",
    )
    a = step("a", a_code, outputs=["out"])
    a["container"]["args"] = ["/tmp/out/out"]
    b = step("b", counting(tmp_path / "b.count", f"sys.exit(5 if pathlib.Path({str(fail_flag)!r}).exists() else 0)"))
    return workflow(
        [
            {"name": "a", "template": "a"},
            {"name": "b", "template": "b", "dependencies": ["a"]},
            {"name": "c", "template": "c", "dependencies": ["b"]},
        ],
        [a, b, step("c", counting(tmp_path / "c.count")), step("fin", counting(tmp_path / "fin.count"))],
        on_exit="fin",
    )


def runs_of(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_failed_run_resumes_from_the_failed_step(tmp_path):
    """Fault: step b fails. Must hold: the resume keeps a (not rerun, its output reused), runs
    b and c once more, keeps the run's name and UID, and records attempt 2."""
    flag = tmp_path / "fail"
    flag.touch()
    wf = pipeline(tmp_path, flag)
    first = run_workflow(wf, tmp_path / "runs", name="r-1")
    assert first.phase == "Failed" and first.steps["c"].phase == "Omitted"
    before = json.loads((first.folder / "status.json").read_text())
    flag.unlink()
    again = run_workflow(wf, tmp_path / "runs", name="r-1", resume=True)
    assert again.phase == "Succeeded"
    assert runs_of(tmp_path / "a.count") == 1 and again.steps["a"].outputs == {"out": "plain"}
    assert "reused" in again.steps["a"].message
    assert (runs_of(tmp_path / "b.count"), runs_of(tmp_path / "c.count"), runs_of(tmp_path / "fin.count")) == (2, 1, 2)
    after = json.loads((again.folder / "status.json").read_text())
    assert after["uid"] == before["uid"] and after["attempt"] == 2 and after["phase"] == "Succeeded"


def test_a_step_whose_store_folder_is_gone_runs_again(tmp_path):
    """Fault: a file of a reused step's published folder was deleted. Must hold: the step is
    not reused (its manifest no longer verifies): it runs again, and so does all after it."""
    folder = (tmp_path / "store" / "a").as_uri()
    storage.publish(folder, {"data.bin": b"1234"}, {"kind": "test"})
    flag = tmp_path / "fail"
    flag.touch()
    wf = pipeline(tmp_path, flag, publish_to=folder)
    assert run_workflow(wf, tmp_path / "runs", name="r-2").phase == "Failed"
    (tmp_path / "store" / "a" / "data.bin").unlink()
    flag.unlink()
    again = run_workflow(wf, tmp_path / "runs", name="r-2", resume=True)
    assert (
        again.phase == "Succeeded" and runs_of(tmp_path / "a.count") == 2 and "reused" not in again.steps["a"].message
    )


def test_a_resume_of_another_workflow_or_a_busy_run_is_refused(tmp_path):
    """Faults: the pipeline changed since the run; another engine holds the run. Must hold: a
    clear refusal, nothing run."""
    flag = tmp_path / "fail"
    flag.touch()
    wf = pipeline(tmp_path, flag)
    run_workflow(wf, tmp_path / "runs", name="r-3")
    changed = json.loads(json.dumps(wf))
    changed["spec"]["templates"][1]["activeDeadlineSeconds"] = "61"
    with pytest.raises(NotResumable, match="another Workflow"):
        run_workflow(changed, tmp_path / "runs", name="r-3", resume=True)
    with pytest.raises(NotResumable, match="no local run named r-none"):
        run_workflow(wf, tmp_path / "runs", name="r-none", resume=True)
    with locked(tmp_path / "runs" / "r-3"):
        with pytest.raises(RunBusy, match="being run by another nmm process"):
            run_workflow(wf, tmp_path / "runs", name="r-3", resume=True)
    assert runs_of(tmp_path / "a.count") == 1 and runs_of(tmp_path / "b.count") == 1


ENGINE = """
import json, sys
from nmm.engine import run_workflow
from pathlib import Path
run_workflow(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), name="r-4")
"""


def test_an_engine_killed_mid_step_leaves_a_whole_record_and_the_resume_stops_its_orphans(tmp_path):
    """Fault: SIGKILL of the engine while a step runs (its process, in its own session, lives
    on). Must hold: status.json is whole and names the running step's process group; the
    resume stops that orphan (it must not keep writing next to the new attempt) and runs the
    step again; the step that had succeeded is not rerun."""
    beat, flag = tmp_path / "beat", tmp_path / "slow"
    flag.touch()
    slow = step(
        "b",
        f"import pathlib,time\nwhile pathlib.Path({str(flag)!r}).exists():\n"
        f"    pathlib.Path({str(beat)!r}).write_text(str(time.time())); time.sleep(0.1)",
    )
    wf = workflow(
        [{"name": "a", "template": "a"}, {"name": "b", "template": "b", "dependencies": ["a"]}],
        [step("a", counting(tmp_path / "a.count")), slow],
    )
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    engine = subprocess.Popen([PY, "-c", ENGINE, str(tmp_path / "wf.json"), str(tmp_path / "runs")])
    wait_for(beat.exists, 60, "the slow step to start")
    engine.send_signal(signal.SIGKILL)
    engine.wait()
    record = json.loads((tmp_path / "runs" / "r-4" / "status.json").read_text())
    assert record["phase"] == "Running" and record["steps"]["a"]["phase"] == "Succeeded"
    (orphan,) = record["groups"]
    assert orphan["step"] == "b"
    os.killpg(orphan["pgid"], 0)  # the orphan lives on after the engine's death
    seen = beat.read_text()
    wait_for(lambda: beat.read_text() != seen, 10, "the orphan to keep beating")
    # the step loops while the flag exists: lift it once the orphan is gone, so the new attempt ends
    lift = threading.Thread(
        target=lambda: (wait_for(lambda: not ours(orphan), 60, "the orphan to be stopped"), flag.unlink())
    )
    lift.start()
    again = run_workflow(wf, tmp_path / "runs", name="r-4", resume=True)
    lift.join()
    assert again.phase == "Succeeded" and runs_of(tmp_path / "a.count") == 1
    assert not ours(orphan)  # stopped (SIGTERM) before the step ran again


def test_nmm_retry_of_an_unknown_or_old_run_says_so_with_exit_2(tmp_path):
    from tests.conftest import NMM

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NMM_STORE", "NMM_S3_ENDPOINT")}
    env["NMM_HOME"] = str(tmp_path / ".nmm")
    for name in ("nowhere-1", "..", "../runs"):  # a name that would leave the runs folder is no run's
        r = subprocess.run([NMM, "retry", name], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"no local run named {name}" in r.stderr and "Traceback" not in r.stderr
    old = tmp_path / ".nmm" / "runs" / "old-1"
    old.mkdir(parents=True)
    (old / "workflow.yaml").write_text("kind: Workflow\n")
    r = subprocess.run([NMM, "retry", "old-1"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nmm run FILE --resume old-1" in r.stderr


def _recorded_run(tmp_path) -> tuple[dict, Path]:
    """A local run's folder as `nmm run` leaves it after a failure: its spec, the Workflow it
    compiled to, a status record (nothing is run)."""
    from nmm.compile import CompileSettings, compile_pipeline
    from nmm.compile.workflow import spec_json
    from nmm.spec import parse_pipeline
    from tests.conftest import WORKFLOWS

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NMM_STORE", "NMM_S3_ENDPOINT")}
    env["NMM_HOME"] = str(tmp_path / ".nmm")
    spec = parse_pipeline((WORKFLOWS / "quickstart.yaml").read_text())
    store = (tmp_path / ".nmm" / "store").as_uri()
    wf = compile_pipeline(spec, CompileSettings.local(store))
    folder = tmp_path / ".nmm" / "runs" / "quickstart-abcde"
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(spec_json(spec))
    (folder / "workflow.yaml").write_text(yaml.safe_dump(wf, sort_keys=False))
    (folder / "status.json").write_text(json.dumps({"name": folder.name, "uid": "u-1", "phase": "Failed", "steps": {}}))
    return env, folder


def test_nmm_retry_of_a_corrupt_or_edited_run_exits_2_and_runs_nothing(tmp_path):
    """On main a corrupt status.json was a traceback, and an edited workflow.yaml ran as it was."""
    from tests.conftest import NMM

    env, folder = _recorded_run(tmp_path)
    for corrupt in ('{"name": "quickstart-abcde", "uid"', "[1, 2]", "\udcff"):
        (folder / "status.json").write_text(corrupt, errors="surrogateescape")
        r = subprocess.run([NMM, "retry", folder.name], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "is not a run record" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (folder / "status.json").write_text(json.dumps({"name": folder.name, "uid": "u-1", "phase": "Failed", "steps": {}}))
    wf = yaml.safe_load((folder / "workflow.yaml").read_text())
    wf["spec"]["templates"][1]["container"]["args"].append("--and-something-else")  # edited after the run
    (folder / "workflow.yaml").write_text(yaml.safe_dump(wf, sort_keys=False))
    r = subprocess.run([NMM, "retry", folder.name], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "compiles to another Workflow" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (folder / "logs").exists()  # nothing ran
    for unreadable in ("kind: [unclosed", "#" * (17 << 20)):  # broken YAML; a file past the record limit
        (folder / "workflow.yaml").write_text(unreadable)
        r = subprocess.run([NMM, "retry", folder.name], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "is unreadable" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_lock_or_status_planted_as_a_symlink_is_never_followed(tmp_path):
    from nmm.engine import state

    victim = tmp_path / "precious.txt"
    victim.write_text("not nmm's to truncate")
    run = tmp_path / "runs" / "r-1"
    run.mkdir(parents=True)
    (run / "lock").symlink_to(victim)
    with pytest.raises(state.RunBusy, match="is a symlink"):
        with state.locked(run):
            pass
    (run / "status.json").symlink_to(victim)
    with pytest.raises(state.CorruptRecord):
        state.read_status(run)
    (run / f".status.json.{os.getpid()}.tmp").symlink_to(victim)  # a planted temporary name
    state.write_status(run, {"phase": "Running"})
    assert victim.read_text() == "not nmm's to truncate"
    assert (
        json.loads((run / "status.json").read_text()) == {"phase": "Running"} and not (run / "status.json").is_symlink()
    )
