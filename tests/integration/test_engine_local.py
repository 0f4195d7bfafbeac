"""The local engine on small hand-written Workflows whose steps are `python -c` processes."""

import sys

from nmm.engine import run_workflow

PY = sys.executable


def step(name: str, code: str, outputs=(), inputs=(), retries: int = 0) -> dict:
    t = {
        "name": name,
        "retryStrategy": {"limit": str(retries)},
        "activeDeadlineSeconds": "60",
        "container": {
            "image": "x:1",
            "command": [PY, "-c", code],
            "args": [],
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        },
    }
    if outputs:
        t["outputs"] = {"parameters": [{"name": o, "valueFrom": {"path": f"/tmp/out/{o}"}} for o in outputs]}
    if inputs:
        t["inputs"] = {"parameters": [{"name": i} for i in inputs]}
    return t


def workflow(tasks: list[dict], templates: list[dict], on_exit: str | None = None) -> dict:
    wf = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"generateName": "t-"},
        "spec": {
            "entrypoint": "main",
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "templates": [{"name": "main", "dag": {"tasks": tasks}}, *templates],
        },
    }
    if on_exit:
        wf["spec"]["onExit"] = on_exit
    return wf


def writer(name: str, value: str) -> str:
    """Code that writes `value` to the path in argv[1] (the engine maps /tmp/… to the step's folder)."""
    return (
        "import pathlib,sys; p=pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True, exist_ok=True); "
        f"p.write_text({value!r})"
    )


def test_outputs_flow_between_steps_and_when_skips(tmp_path):
    a = step("a", writer("gate", "fail"), outputs=["gate"])
    a["container"]["args"] = ["/tmp/out/gate"]
    b = step("b", "import sys; assert sys.argv[1] == 'fail', sys.argv; print('got', sys.argv[1])", inputs=["g"])
    b["container"]["args"] = ["{{inputs.parameters.g}}"]
    c = step("c", "print('should not run')")
    wf = workflow(
        [
            {"name": "a", "template": "a"},
            {
                "name": "b",
                "template": "b",
                "dependencies": ["a"],
                "arguments": {"parameters": [{"name": "g", "value": "{{tasks.a.outputs.parameters.gate}}"}]},
            },
            {
                "name": "c",
                "template": "c",
                "dependencies": ["b"],
                "when": "{{tasks.a.outputs.parameters.gate}} == pass",
            },
        ],
        [a, b, c],
    )
    r = run_workflow(wf, tmp_path)
    assert r.phase == "Succeeded"
    assert r.steps["a"].outputs == {"gate": "fail"}
    assert r.steps["b"].phase == "Succeeded" and "got fail" in r.steps["b"].logs[0].read_text()
    assert r.steps["c"].phase == "Skipped"


def test_retry_strategy_retries_a_failing_step_until_it_succeeds(tmp_path):
    marker = tmp_path / "attempts"
    code = (
        f"import pathlib,sys; p=pathlib.Path({str(marker)!r}); n=int(p.read_text()) if p.exists() else 0; "
        "p.write_text(str(n+1)); sys.exit(0 if n >= 2 else 3)"
    )
    wf = workflow([{"name": "flaky", "template": "flaky"}], [step("flaky", code, retries=2)])
    r = run_workflow(wf, tmp_path / "runs")
    assert r.phase == "Succeeded" and r.steps["flaky"].attempts == 3


def test_failure_omits_dependents_and_exit_handler_sees_status(tmp_path):
    status_file = tmp_path / "status"
    fin = step("fin", f"import pathlib,sys; pathlib.Path({str(status_file)!r}).write_text(sys.argv[1])")
    fin["container"]["args"] = ["{{workflow.status}}"]
    wf = workflow(
        [{"name": "bad", "template": "bad"}, {"name": "after", "template": "after", "dependencies": ["bad"]}],
        [step("bad", "import sys; print('boom'); sys.exit(7)", retries=1), step("after", "print(1)"), fin],
        on_exit="fin",
    )
    r = run_workflow(wf, tmp_path / "runs")
    assert r.phase == "Failed"
    assert r.steps["bad"].phase == "Failed" and r.steps["bad"].attempts == 2
    assert r.steps["bad"].message == "exit code 7"
    assert "boom" in r.steps["bad"].logs[-1].read_text()
    assert r.steps["after"].phase == "Omitted"
    assert status_file.read_text() == "Failed"
    assert (r.folder / "status.json").exists()


def test_deadline_kills_a_step_that_runs_too_long(tmp_path):
    slow = step("slow", "import time; time.sleep(30)")
    slow["activeDeadlineSeconds"] = "1"
    r = run_workflow(workflow([{"name": "slow", "template": "slow"}], [slow]), tmp_path)
    assert r.steps["slow"].phase == "Failed" and r.steps["slow"].message == "exit code 124"


def test_missing_output_parameter_fails_the_step(tmp_path):
    wf = workflow([{"name": "a", "template": "a"}], [step("a", "print('no output written')", outputs=["x"])])
    r = run_workflow(wf, tmp_path)
    assert r.phase == "Failed" and "was not written" in r.steps["a"].message


def pytorchjob_step(name: str, code: str, backoff_limit: int, nproc_replicas: int = 2) -> dict:
    """A train-like resource step: a PyTorchJob of `nproc_replicas` pods running `code`."""
    import yaml

    pod = {"spec": {"containers": [{"name": "pytorch", "image": "x:1", "command": [PY, "-c", code], "args": []}]}}
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "{{workflow.name}}-train"},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, "template": pod},
                "Worker": {"replicas": nproc_replicas - 1, "template": pod},
            },
            "runPolicy": {"backoffLimit": backoff_limit},
        },
    }
    return {
        "name": name,
        "retryStrategy": {"limit": "0"},
        "activeDeadlineSeconds": "60",
        "resource": {"action": "create", "manifest": yaml.safe_dump(job)},
    }


def test_a_pytorchjob_whose_replica_dies_is_started_again_within_its_backoff_limit_r19(tmp_path):
    """Fault: one replica (rank 1) dies on its first two starts. Must hold: the whole group starts
    again, as many times as `runPolicy.backoffLimit` allows and no more; the restarts are
    recorded and written into the step's log."""
    marker = tmp_path / "starts"
    code = (
        f"import os,pathlib,sys; p=pathlib.Path({str(marker)!r}); rank=os.environ['RANK']; "
        "n=len(p.read_text().split()) if p.exists() else 0\n"
        "if rank == '1': p.write_text(p.read_text() + ' x' if p.exists() else 'x')\n"
        "sys.exit(9 if rank == '1' and n < 2 else 0)"
    )
    ok = run_workflow(
        workflow([{"name": "train", "template": "train"}], [pytorchjob_step("train", code, 2)]), tmp_path / "a"
    )
    assert ok.phase == "Succeeded" and ok.steps["train"].attempts == 1 and ok.steps["train"].restarts == 2
    log = ok.steps["train"].logs[0].read_text()
    assert "restart 1 of backoffLimit 2" in log and "restart 2 of backoffLimit 2" in log
    marker.unlink()
    bounded = run_workflow(
        workflow([{"name": "train", "template": "train"}], [pytorchjob_step("train", code, 1)]), tmp_path / "b"
    )
    assert bounded.phase == "Failed" and bounded.steps["train"].restarts == 1
    assert bounded.steps["train"].message == "exit code 9"
