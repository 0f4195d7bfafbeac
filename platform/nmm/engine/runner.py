"""Walk a compiled Workflow's DAG and run each step locally."""

from __future__ import annotations

import graphlib
import secrets
import string
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nmm import storage
from nmm.engine import process, pytorchjob, rayjob, state
from nmm.engine.params import substitute, substitute_all
from nmm.engine.progress import Progress
from nmm.engine.sandbox import Sandbox, container_env, resolve_command
from nmm.engine.when import evaluate

# Fields the local engine reads but that have no effect on this machine (warned about once).
NO_LOCAL_EFFECT = (
    "image",
    "imagePullPolicy",
    "resources",
    "securityContext",
    "serviceAccountName",
    "podGC",
    "ttlStrategy",
    "podMetadata",
    "nodeSelector",
    "affinity",
    "tolerations",
    "backoff",
    "setOwnerReference",
    "cleanPodPolicy",
    "ttlSecondsAfterFinished",
    "automountServiceAccountToken",
    "secretKeyRef",
    "namespace",
    "kueue.x-k8s.io/queue-name",
    "kueue.x-k8s.io/priority-class",
)


@dataclass
class StepResult:
    name: str
    phase: str = "Pending"  # Pending, Running, Succeeded, Failed, Skipped, Omitted, Error
    attempts: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None
    message: str = ""
    restarts: int = 0  # a PyTorchJob's group started again within its attempts (backoffLimit)

    @property
    def duration(self) -> float:
        return (self.finished or time.time()) - (self.started or time.time())


@dataclass
class RunResult:
    name: str
    phase: str
    folder: Path
    steps: dict[str, StepResult]
    wall_s: float
    warnings: list[str]


def workflow_name(generate_name: str) -> str:
    """What the API server does with generateName: append 5 random characters."""
    alphabet = string.ascii_lowercase + string.digits
    return generate_name + "".join(secrets.choice(alphabet) for _ in range(5))


def _present(obj, keys: set[str], found: set[str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in keys:
                found.add(k)
            _present(v, keys, found)
    elif isinstance(obj, list):
        for x in obj:
            _present(x, keys, found)


def no_local_effect(workflow: dict) -> list[str]:
    """Which fields of this Workflow have no local effect."""
    found: set[str] = set()
    _present(workflow, set(NO_LOCAL_EFFECT), found)
    for t in workflow["spec"]["templates"]:
        if "resource" in t:
            _present(yaml.safe_load(t["resource"]["manifest"]), set(NO_LOCAL_EFFECT), found)
    return sorted(found)


def topo_order(tasks: list[dict]) -> list[dict]:
    """The DAG's tasks, each after its dependencies (graphlib): at every point the first task, in
    the Workflow's own order, whose dependencies are done (so a variant's evaluate follows its
    train before the next variant's train starts)."""
    by_name = {t["name"]: t for t in tasks}
    index = {name: i for i, name in enumerate(by_name)}
    graph = graphlib.TopologicalSorter()
    for t in tasks:
        for d in t.get("dependencies", []):
            if d not in by_name:
                raise ValueError(f"task {t['name']!r} depends on unknown task {d!r}")
        graph.add(t["name"], *t.get("dependencies", []))
    try:
        graph.prepare()
    except graphlib.CycleError as exc:
        raise ValueError(f"DAG has a cycle through {exc.args[1][0]!r}") from None
    order, ready = [], []
    while graph.is_active():
        ready = sorted(ready + list(graph.get_ready()), key=index.__getitem__)
        name = ready.pop(0)
        order.append(by_name[name])
        graph.done(name)
    return order


class Engine:
    def __init__(
        self,
        workflow: dict,
        runs_dir: Path,
        progress: Progress | None = None,
        name: str | None = None,
        cwd: str | None = None,
        prior: dict | None = None,
    ):
        """`prior`: the status record of an earlier attempt of this run (`state.read_status`):
        the run keeps its name and UID, and its succeeded steps are reused."""
        self.wf = workflow
        self.templates = {t["name"]: t for t in workflow["spec"]["templates"]}
        self.name = name or workflow_name(workflow["metadata"]["generateName"])
        self.uid = prior["uid"] if prior else str(uuid.uuid4())  # what the API server gives a new Workflow
        self.attempt = prior.get("attempt", 1) + 1 if prior else 1
        self.prior = prior["steps"] if prior else {}
        self.folder = runs_dir / self.name
        self.volumes = workflow["spec"].get("volumes", [])
        self.cwd = cwd
        self.progress = progress
        self.steps: dict[str, StepResult] = {}
        self.status: str | None = None
        self.groups: list[dict] = []  # the process groups of the step running now
        self.t0 = time.time()

    def record(self, phase: str = "Running") -> None:
        """Write the run's status (atomically): after every transition, so a kill leaves it whole."""
        state.write_status(
            self.folder,
            {
                "name": self.name,
                "uid": self.uid,
                "phase": phase,
                "attempt": self.attempt,
                "wall_s": round(time.time() - self.t0, 2),
                "groups": self.groups,
                "steps": {
                    k: {
                        "phase": v.phase,
                        "attempts": v.attempts,
                        "restarts": v.restarts,
                        "outputs": v.outputs,
                        "message": v.message,
                    }
                    for k, v in self.steps.items()
                },
            },
        )

    def _scope(self) -> dict[str, str]:
        scope = {
            "workflow.name": self.name,
            "workflow.uid": self.uid,
            "workflow.namespace": self.wf["metadata"].get("namespace", "default"),
        }
        if self.status:
            scope["workflow.status"] = self.status
        for s in self.steps.values():
            for k, v in s.outputs.items():
                scope[f"tasks.{s.name}.outputs.parameters.{k}"] = v
        return scope

    def _notify(self, step: str, **kw) -> None:
        if self.progress:
            self.progress.update(step, **kw)

    def _attempt(
        self, task_name: str, template: dict, params: dict[str, str], attempt: int
    ) -> tuple[int, list[Path], dict[str, str]]:
        scope = self._scope() | {f"inputs.parameters.{k}": v for k, v in params.items()} | {"retries": str(attempt)}
        step_dir = self.folder / "steps" / f"{task_name}-{attempt}"
        log_dir = self.folder / "logs"
        deadline = float(template.get("activeDeadlineSeconds", 0)) or None
        prefix = f"{task_name}-{attempt}"
        restart_limit = 0  # how often a failed group is started again within this attempt
        if "resource" in template:
            manifest = substitute(template["resource"]["manifest"], scope)
            doc = yaml.safe_load(manifest)
            if doc.get("kind") == "RayJob":

                def start():
                    return rayjob.launch_job(doc, step_dir, log_dir, prefix, self.cwd)

                restart_limit = rayjob.backoff_limit(doc)
            else:

                def start():
                    return pytorchjob.launch_job(manifest, step_dir, log_dir, prefix)[0]

                restart_limit = pytorchjob.backoff_limit(doc)
            sandbox = None
        else:
            c = substitute_all(template["container"], scope)
            sandbox = Sandbox.for_container(c, self.volumes, step_dir)
            env = container_env(c, sandbox, {"NMM_ENGINE": "local"})
            argv = resolve_command(sandbox.map_argv(c.get("command", []) + c.get("args", [])))

            def start():
                return [process.launch(task_name, argv, env, log_dir / f"{prefix}.log", cwd=self.cwd)]

        code, logs = self._run_group(task_name, start, deadline, restart_limit)
        outputs = {}
        if code == 0 and sandbox is not None:
            for p in template.get("outputs", {}).get("parameters", []):
                path = Path(sandbox.map_path(p["valueFrom"]["path"]))
                if not path.is_file():
                    return (
                        1,
                        logs,
                        {"_error": f"output parameter {p['name']!r}: {p['valueFrom']['path']} was not written"},
                    )
                outputs[p["name"]] = path.read_text()
        return code, logs, outputs

    def _run_group(self, task_name: str, start, deadline: float | None, restart_limit: int) -> tuple[int, list[Path]]:
        """Run one attempt's processes to the end. A job's failed group is started again up to its
        backoffLimit: a PyTorchJob's `runPolicy.backoffLimit` (the spec's `training.maxRestarts`),
        as the Training Operator restarts a failed replica (`restartPolicy: OnFailure`), and the
        trainer resumes from its latest checkpoint (R19); a RayJob's `backoffLimit`. Restarts
        share the attempt's deadline and log files."""
        t0 = time.monotonic()
        logs: list[Path] = []
        restarts = 0
        while True:
            group = start()
            logs += [p.log_path for p in group if p.log_path not in logs]
            self.groups = [
                {"step": task_name, "pgid": p.proc.pid, "start": state.start_time(p.proc.pid)} for p in group
            ]
            self.record()
            left = None if deadline is None else max(0.0, deadline - (time.monotonic() - t0))
            try:
                codes = process.wait_all(
                    group, left, on_tick=lambda logs=logs: self._notify(task_name, note=process.last_line(logs[0]))
                )
            finally:
                self.groups = []
            code = next((c for c in codes.values() if c != 0), 0)
            if code in (0, 124) or restarts >= restart_limit:
                return code, logs
            restarts += 1
            self.steps[task_name].restarts += 1
            failed = ", ".join(f"{k} exit {c}" for k, c in codes.items() if c != 0)
            line = (
                f"nmm: a replica failed ({failed}); starting the job's processes again "
                f"(restart {restarts} of backoffLimit {restart_limit})"
            )
            with open(logs[0], "a") as f:
                f.write(line + "\n")
            self._notify(task_name, note=line)

    def run_task(self, task: dict) -> StepResult:
        name = task["name"]
        template = self.templates[task["template"]]
        result = self.steps.setdefault(name, StepResult(name))
        scope = self._scope()
        params = {
            p["name"]: substitute(p.get("value", ""), scope) for p in task.get("arguments", {}).get("parameters", [])
        }
        limit = int(template.get("retryStrategy", {}).get("limit", 0))
        result.started = time.time()
        for attempt in range(limit + 1):
            result.attempts = attempt + 1
            self._notify(name, phase="Running", attempt=attempt + 1)
            code, logs, outputs = self._attempt(name, template, params, attempt)
            result.logs += logs
            if code == 0:
                result.outputs = outputs
                result.phase = "Succeeded"
                break
            result.message = outputs.get("_error") or f"exit code {code}"
            result.phase = "Failed"
        result.finished = time.time()
        self._notify(name, phase=result.phase, note=result.message if result.phase == "Failed" else "")
        self.record()
        return result

    def reuse(self, task: dict, ran: set[str]) -> bool:
        """Keep a step that succeeded in an earlier attempt of this run: when none of its
        dependencies ran again in this one and every store folder among its outputs is still
        whole (its manifest and every file listed; a store that cannot be read is an error, not
        a reason to rerun)."""
        before = self.prior.get(task["name"])
        if not before or before["phase"] != "Succeeded" or ran & set(task.get("dependencies", [])):
            return False
        for value in before["outputs"].values():
            if value.startswith(("file://", "s3://")) and storage.read_manifest(value, verify=True) is None:
                return False
        self.steps[task["name"]] = StepResult(
            task["name"],
            "Succeeded",
            attempts=before["attempts"],
            outputs=dict(before["outputs"]),
            restarts=before.get("restarts", 0),
            message="reused: succeeded in an earlier attempt of this run",
        )
        self._notify(task["name"], phase="Succeeded", note="reused")
        return True

    def run(self) -> RunResult:
        entry = self.templates[self.wf["spec"]["entrypoint"]]
        failed = False
        ran: set[str] = set()  # steps run in this attempt: what depends on them runs again too
        self.record()
        for task in topo_order(entry["dag"]["tasks"]):
            deps = [self.steps[d] for d in task.get("dependencies", [])]
            if failed or any(d.phase in ("Failed", "Error", "Omitted") for d in deps):
                self.steps[task["name"]] = StepResult(task["name"], phase="Omitted")
                self._notify(task["name"], phase="Omitted")
                continue
            if "when" in task and not evaluate(substitute(task["when"], self._scope())):
                self.steps[task["name"]] = StepResult(
                    task["name"], phase="Skipped", message=f"when: {substitute(task['when'], self._scope())}"
                )
                self._notify(task["name"], phase="Skipped")
                continue
            if self.reuse(task, ran):
                continue
            ran.add(task["name"])
            if self.run_task(task).phase != "Succeeded":
                failed = True
        phase = "Failed" if failed else "Succeeded"
        exit_name = self.wf["spec"].get("onExit")
        if exit_name:
            self.status = phase  # {{workflow.status}} is defined for the exit handler
            self.run_task({"name": exit_name, "template": exit_name})
        self.record(phase)
        return RunResult(self.name, phase, self.folder, self.steps, time.time() - self.t0, no_local_effect(self.wf))


WORKFLOW_FILE = "workflow.yaml"


def run_workflow(
    workflow: dict,
    runs_dir: Path,
    progress: Progress | None = None,
    name: str | None = None,
    cwd: str | None = None,
    resume: bool = False,
) -> RunResult:
    """Run the Workflow as `name` (default: generateName + 5 characters). `resume`: run `name`
    again, the same compiled Workflow under the same UID, reusing the steps that succeeded
    (`Engine.reuse`); what is left of its earlier attempt's processes is stopped first."""
    folder = runs_dir / (name or workflow_name(workflow["metadata"]["generateName"]))
    with state.locked(folder):
        prior = None
        if resume:
            prior = resumable(folder, workflow)
            state.stop_groups(prior.get("groups", []))
        engine = Engine(workflow, runs_dir, progress, folder.name, cwd, prior)
        if not resume:
            (folder / WORKFLOW_FILE).write_text(yaml.safe_dump(workflow, sort_keys=False, width=1 << 20))
        return engine.run()


class NotResumable(Exception):
    """This run cannot be resumed as asked (the message says why)."""


def stored_workflow(folder: Path) -> dict:
    """The Workflow a local run ran (its workflow.yaml); NotResumable when it is not one."""
    try:
        wf = yaml.safe_load(state.read_text(folder / WORKFLOW_FILE))
    except FileNotFoundError:
        raise NotResumable(f"no local run named {folder.name} (looked in {folder.parent})") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError, state.CorruptRecord) as exc:
        raise NotResumable(f"{folder / WORKFLOW_FILE} is unreadable ({type(exc).__name__}); start a new run") from None
    if not isinstance(wf, dict) or not isinstance(wf.get("metadata"), dict):
        raise NotResumable(f"{folder / WORKFLOW_FILE} is not a Workflow; start a new run")
    return wf


def resumable(folder: Path, workflow: dict | None = None) -> dict:
    """The status record of a run that can be resumed with `workflow` (default: its own): the
    Workflow it ran must be the one its pipeline compiles to now (an edited workflow.yaml, or a
    changed spec or store, is refused, never run)."""
    try:
        prior = state.read_status(folder)
    except state.CorruptRecord as exc:
        raise NotResumable(f"{exc}; start a new run") from None
    if prior is None or not (folder / WORKFLOW_FILE).is_file():
        raise NotResumable(f"no local run named {folder.name} (looked in {folder.parent})")
    if "uid" not in prior:
        raise NotResumable(f"run {folder.name} was recorded without its UID (by an older nmm); start a new run")
    if workflow is not None and stored_workflow(folder) != workflow:
        raise NotResumable(
            f"the pipeline compiles to another Workflow than run {folder.name} ran (its workflow.yaml was "
            "edited, or the spec, the store or nmm changed): a resume runs the same one; start a new run"
        )
    return prior
