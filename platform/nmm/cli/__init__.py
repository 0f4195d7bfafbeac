"""The `nmm` command line.

nmm validate FILE        check a pipeline YAML (exit 2 with one line per problem)
nmm compile FILE         print the Argo Workflow it compiles to
nmm run FILE             compile and run it here with the embedded local engine
nmm ui                   the MLflow UI on the local tracking store
nmm submit FILE          create/update the pipeline on the cluster (kube context)
nmm status NAME          its status on the cluster
nmm logs NAME --stage S  a stage's logs (pods, or the copy archived in the store)
nmm crd                  the NMMPipeline CustomResourceDefinition
nmm serve MODEL          an OpenAI-compatible server for a model
nmm promote NAME VER     serve a version at once (champion moves; no canary)
nmm rollback NAME        stop a canary, or go back to the version served before
nmm data export|ledger   a built-in source as WebDataset shards; a dataset's per-sample ledger
nmm gpu inventory        this machine's GPUs (NVML); --label-node labels the node
nmm stage NAME …         a stage entrypoint (what Workflow steps run)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import typer

from nmm import exitcodes
from nmm.cli.data import data_app
from nmm.cli.output import EXIT_BAD_INPUT, err, exits, out
from nmm.cli.serving import promote, rollback
from nmm.cli.stage import stage_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)
gpu_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="GPU inventory of this machine or node.",
)
app.add_typer(stage_app, name="stage")
app.add_typer(gpu_app, name="gpu")
app.add_typer(data_app, name="data")
app.command()(promote)
app.command()(rollback)


def _load_spec(path: Path):
    """Read and validate a pipeline file; on any problem print it and exit 2."""
    from nmm.spec import SpecError, parse_pipeline
    from nmm.spec.parse import MAX_SPEC_BYTES

    try:
        with path.open("rb") as f:  # never more than the limit (+1 to tell that it is over)
            raw = f.read(MAX_SPEC_BYTES + 1)
        text = raw.decode("utf-8", "replace" if len(raw) > MAX_SPEC_BYTES else "strict")
    except (OSError, UnicodeDecodeError) as exc:
        err.print(f"[red]error[/]: {path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        return parse_pipeline(text, str(path))
    except SpecError as exc:
        err.print(
            f"[red]error[/]: {path} is not a valid NMMPipeline "
            f"({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):"
        )
        for line in exc.problems:
            err.print(f"  {line}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


@app.command()
def validate(file: Path = typer.Argument(..., help="Pipeline YAML")) -> None:
    """Validate a pipeline YAML."""
    spec = _load_spec(file)
    out.print(
        f"{file}: valid NMMPipeline {spec.metadata.name!r} "
        f"({spec.spec.model.category}, fusion {spec.spec.model.fusion})"
    )


@app.command("compile")
def compile_(
    file: Path = typer.Argument(..., help="Pipeline YAML"),
    image: str | None = typer.Option(None, help="Platform image for every step"),
    namespace: str | None = typer.Option(None, help="Namespace of the Workflow"),
    store: str | None = typer.Option(None, help="Store URI (s3://bucket/prefix)"),
    service_account: str | None = typer.Option(None, help="Service account of workflow pods"),
) -> None:
    """Print the Argo Workflow (YAML) the pipeline compiles to."""
    from dataclasses import replace

    from nmm.compile import CompileSettings, to_yaml

    spec = _load_spec(file)
    settings = CompileSettings()
    ns = _namespace(spec, namespace, settings.namespace)
    overrides = {
        k: v
        for k, v in {"image": image, "namespace": ns, "store_uri": store, "service_account": service_account}.items()
        if v
    }
    sys.stdout.write(to_yaml(_compile(spec, replace(settings, **overrides))))


def _namespace(spec, flag: str | None, fallback: str) -> str:
    """The namespace by the one precedence of every command (flag and metadata.namespace must
    agree; either beats the fallback); a contradiction exits 2."""
    from nmm.spec import NamespaceConflict

    try:
        return spec.resolve_namespace(flag, fallback)
    except NamespaceConflict as exc:
        err.print(f"[red]error[/]: {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _compile(spec, settings) -> dict:
    """Compile; a request no GPU pool can hold (or a model too big for it) exits 2."""
    from nmm.compile import compile_pipeline
    from nmm.gpu.pools import PlacementError

    try:
        return compile_pipeline(spec, settings)
    except PlacementError as exc:
        err.print(f"[red]error[/]: {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _seed_summary(per_run: dict[str, dict[str, float]], groups: dict[str, list[str]], gate: str) -> None:
    """An ablation on several seeds: mean ± standard deviation per variant, then the differences
    larger than the seed spread (nmm.evaluate.seeds)."""
    from rich.table import Table

    from nmm.evaluate import seeds

    agg = seeds.aggregate(per_run, groups)
    m = Table(title=f"evaluation across seeds: mean ± std (seeds measured); {gate}")
    m.add_column("metric")
    for v in agg:
        m.add_column(v, justify="right")
    for k in sorted({k for ms in agg.values() for k in ms}, key=lambda k: (k.split(".")[0], k)):
        m.add_row(k, *[f"{ms[k][0]:.4f} ± {ms[k][1]:.4f} ({ms[k][2]})" if k in ms else "" for ms in agg.values()])
    out.print(m)
    pairs = seeds.apart(agg)
    for k, a, b in pairs:
        out.print(f"{k}: {a} and {b} differ by more than the seed spread")
    if not pairs:
        out.print("no difference between variants is larger than the seed spread")


def _summary(result, spec) -> None:
    from rich.table import Table

    steps = result.steps
    t = Table(title=f"{result.name}: {result.phase} in {result.wall_s:.1f}s", show_header=True)
    t.add_column("step")
    t.add_column("phase")
    t.add_column("time", justify="right")
    t.add_column("attempts", justify="right")
    for name, s in steps.items():
        t.add_row(name, s.phase, f"{s.duration:.1f}s" if s.started else "", str(s.attempts or ""))
    out.print(t)
    from nmm.spec import split_step

    evals = {
        split_step(n)[1] or "": s
        for n, s in steps.items()
        if split_step(n)[0] == "evaluate" and s.outputs.get("metrics")
    }
    if evals and spec.seed_groups:
        first = next(iter(evals))
        _seed_summary(
            {v: json.loads(s.outputs["metrics"]) for v, s in evals.items()},
            spec.seed_groups,
            f"rollout candidate {first}: gate {evals[first].outputs.get('gate')}",
        )
    elif evals:
        gates = {g.metric: g for g in spec.spec.evaluation.parsed_gates}
        table = {v: json.loads(s.outputs["metrics"]) for v, s in evals.items()}
        first = next(iter(table))
        title = "evaluation" if first == "" else "evaluation, side by side (rollout candidate: " + first + ")"
        m = Table(title=f"{title} (gate: {evals[first].outputs.get('gate')})")
        m.add_column("metric")
        m.add_column("kind")
        for v in table:
            m.add_column(v or "value", justify="right")
        m.add_column("gate")
        names = sorted({k for t in table.values() for k in t}, key=lambda k: (k.split(".")[0], k))
        for k in names:
            g, v0 = gates.get(k), table[first].get(k)
            verdict = f"{g} → {'pass' if g.passes(v0) else 'FAIL'}" if g and v0 is not None else ""
            kind = {"m2t": "understanding", "m2g": "generation"}.get(k.split(".")[0], "")
            m.add_row(k, kind, *[f"{t[k]:.4f}" if k in t else "" for t in table.values()], verdict)
        out.print(m)
    cur = steps.get("curate")
    if cur and cur.outputs:
        out.print(
            f"dataset   {cur.outputs.get('dataset_uri')}  "
            f"({cur.outputs.get('cache')}, {cur.outputs.get('dataset_digest')})"
        )
    ro = steps.get("rollout")
    if ro and ro.outputs:
        out.print(
            f"model     {spec.spec.rollout.registered_model_name} version {ro.outputs.get('version')}: "
            f"{ro.outputs.get('decision')}"
        )
    fin = steps.get("finalize")
    from nmm import lineage

    if fin and fin.outputs:
        out.print(f"mlflow    {lineage.tracking_uri()}  run {fin.outputs.get('mlflow_run_id')}  (see: nmm ui)")
    out.print(f"logs      {result.folder / 'logs'}")


@app.command()
def run(
    file: Path = typer.Argument(..., help="Pipeline YAML"),
    store: str | None = typer.Option(
        None, help="Store URI; default .nmm/store, or s3://$NMM_S3_BUCKET when NMM_S3_ENDPOINT is set"
    ),
    resume: str | None = typer.Option(
        None,
        "--resume",
        metavar="RUN",
        help="Resume the local run RUN of this pipeline "
        "(failed or killed): its succeeded steps are kept, the rest runs again",
    ),
) -> None:
    """Compile the pipeline and run the compiled Workflow here (embedded local engine)."""
    spec = _load_spec(file)
    from dataclasses import replace

    from nmm import storage
    from nmm.compile import CompileSettings
    from nmm.engine.runner import no_local_effect, workflow_name

    local = CompileSettings.local(store or storage.default_store_uri())
    workflow = _compile(spec, replace(local, namespace=_namespace(spec, None, local.namespace)))
    ignored = no_local_effect(workflow)
    if ignored:
        err.print(f"[yellow]warning[/]: no local effect (cluster only): {', '.join(ignored)}")
    _run_local(workflow, spec, resume or workflow_name(workflow["metadata"]["generateName"]), resume is not None)


@app.command()
def retry(
    run_name: str = typer.Argument(..., metavar="RUN", help="A local run (see .nmm/runs), or with -n a pipeline"),
    namespace: str | None = typer.Option(None, "--namespace", "-n", help="Retry the pipeline RUN on the cluster"),
) -> None:
    """Resume a failed or killed local run with the Workflow it ran (`nmm run FILE --resume RUN`
    without the file): succeeded steps are kept, training resumes from its latest checkpoint.
    With -n: the operator retries the pipeline's failed Workflow the way `argo retry` does."""
    if namespace is not None:
        from nmm import cluster

        value = _cluster_call(cluster.retry, run_name, namespace)
        out.print(
            f"nmmpipeline {namespace}/{run_name}: retry asked (nmm.dev/retry={value}); follow it: "
            f"nmm status {run_name} -n {namespace}"
        )
        return
    from dataclasses import replace

    from nmm.cluster import store_of
    from nmm.compile import CompileSettings
    from nmm.engine.runner import WORKFLOW_FILE, NotResumable, stored_workflow
    from nmm.engine.state import run_folder
    from nmm.home import home_dir
    from nmm.spec import SpecError
    from nmm.spec.parse import parse_json

    folder = run_folder(home_dir() / "runs", run_name)
    if folder is None or not (folder / WORKFLOW_FILE).is_file():
        err.print(f"[red]error[/]: no local run named {run_name} (looked in {home_dir() / 'runs'})", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    if not (folder / SPEC_FILE).is_file():
        err.print(
            f"[red]error[/]: run {run_name} was made by an older nmm (no {SPEC_FILE}); resume it with "
            f"nmm run FILE --resume {run_name}",
            highlight=False,
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    try:  # the Workflow a retry runs is compiled again from the run's spec, then compared with the one it ran
        stored = stored_workflow(folder)
        spec = parse_json((folder / SPEC_FILE).read_text(errors="replace"), str(folder / SPEC_FILE))
    except (NotResumable, SpecError) as exc:
        problems = "\n  ".join(exc.problems) if isinstance(exc, SpecError) else str(exc)
        err.print(f"[red]error[/]: run {run_name} cannot be retried: {problems}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    local = CompileSettings.local(store_of(stored) or "")
    workflow = _compile(spec, replace(local, namespace=_namespace(spec, None, local.namespace)))
    _run_local(workflow, spec, run_name, True)


SPEC_FILE = "spec.json"  # next to a local run's workflow.yaml: what `nmm retry` summarises with


def _run_local(workflow: dict, spec, name: str, resume: bool) -> None:
    """Run (or resume) `workflow` as the local run `name`, with live progress and a summary."""
    from nmm.engine import run_workflow
    from nmm.engine.process import tail
    from nmm.engine.progress import Progress
    from nmm.engine.runner import NotResumable, resumable
    from nmm.engine.state import RunBusy
    from nmm.home import home_dir

    runs = home_dir() / "runs"
    if resume:
        try:
            prior = resumable(runs / name, workflow)
        except NotResumable as exc:
            err.print(f"[red]error[/]: {exc}", highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        if prior["phase"] == "Succeeded":
            out.print(f"run {name} already succeeded; nothing to resume")
            return
        err.print(
            f"resuming run {name} (uid {prior['uid']}, attempt {prior.get('attempt', 1) + 1}): steps that "
            "succeeded are kept"
        )
    else:
        from nmm.compile.workflow import spec_json

        (runs / name).mkdir(parents=True, exist_ok=True)
        (runs / name / SPEC_FILE).write_text(spec_json(spec))
    steps = [t["name"] for t in workflow["spec"]["templates"][0]["dag"]["tasks"]] + [workflow["spec"]["onExit"]]
    try:
        with exits(), Progress(name, steps, err) as progress:
            result = run_workflow(workflow, runs, progress, name=name, resume=resume)
    except RunBusy as exc:
        err.print(f"[red]error[/]: {exc}", highlight=False)
        raise typer.Exit(exitcodes.FAILED) from None
    _summary(result, spec)
    if result.phase != "Succeeded":
        for s in result.steps.values():
            if s.phase == "Failed":
                err.print(f"[red]step {s.name} failed[/] ({s.message}); last lines of {s.logs[-1]}:")
                sys.stderr.write(tail(s.logs[-1]) + "\n")
        err.print(f"resume it: nmm retry {name}", highlight=False)
        raise typer.Exit(exitcodes.FAILED)


def _cluster_call(fn, *args):
    """Run a cluster call; a cluster problem is a clear message and exit 1, not a traceback."""
    from nmm.cluster import ClusterError

    try:
        return fn(*args)
    except ClusterError as exc:
        err.print(f"[red]error[/]: {exc}", highlight=False)
        raise typer.Exit(exitcodes.FAILED) from None


NamespaceOpt = typer.Option(None, "--namespace", "-n", help="Namespace (default: the kube context's)")


@app.command()
def submit(file: Path = typer.Argument(..., help="Pipeline YAML"), namespace: str | None = NamespaceOpt) -> None:
    """Create or update the pipeline in the current kube context (the operator runs it)."""
    from nmm import cluster

    spec = _load_spec(file)
    ns = _namespace(spec, namespace, cluster.current_namespace())
    action, generation = _cluster_call(cluster.submit, spec, ns)
    out.print(
        f"nmmpipeline {ns}/{spec.metadata.name} {action} (generation {generation}); "
        f"follow it: nmm status {spec.metadata.name} -n {ns}"
    )


@app.command()
def status(name: str = typer.Argument(..., help="Pipeline name"), namespace: str | None = NamespaceOpt) -> None:
    """The pipeline's status: phase, stages, workflow, MLflow run, champion, conditions."""
    from rich.table import Table

    from nmm import cluster

    ns = namespace or cluster.current_namespace()
    obj = _cluster_call(cluster.get_pipeline, name, ns)
    st = obj.get("status") or {}
    t = Table(title=f"nmmpipeline {ns}/{name} (generation {obj['metadata'].get('generation', 1)})", show_header=False)
    t.add_column("field")
    t.add_column("value")
    for key in ("phase", "stage", "workflow", "startedAt", "finishedAt", "mlflowRunId", "champion", "message"):
        if st.get(key):
            t.add_row(key, str(st[key]))
    for stage, phase in (st.get("stages") or {}).items():
        t.add_row(f"stage {stage}", phase)
    for c in st.get("conditions") or []:
        t.add_row(f"condition {c['type']}", f"{c['status']} ({c.get('reason', '')}) {c.get('message', '')}".strip())
    out.print(t if st else f"nmmpipeline {ns}/{name}: no status yet (is the operator running?)")


@app.command()
def logs(
    name: str = typer.Argument(..., help="Pipeline name"),
    stage: str = typer.Option(
        ...,
        "--stage",
        help="curate, train, evaluate, rollout or finalize (train-<variant>, evaluate-<variant> in an ablation)",
    ),
    namespace: str | None = NamespaceOpt,
    store: str | None = typer.Option(None, help="Store URI, when the Workflow is gone too"),
) -> None:
    """A stage's logs: from its pods while they exist, else the copy archived in the object store."""
    from nmm import cluster, storage
    from nmm.identity import RunIdentity
    from nmm.spec import split_step
    from nmm.stages.context import STAGES
    from nmm.stages.logs import read_archived
    from nmm.storage.layout import stage_uri

    base, variant = split_step(stage)
    if base not in STAGES or (variant and base not in ("train", "evaluate")) or (variant and not variant.isalnum()):
        err.print(
            f"error: --stage must be one of {', '.join(STAGES)} (or train-<variant>, evaluate-<variant>), got {stage!r}"
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    ns = namespace or cluster.current_namespace()
    obj = _cluster_call(cluster.get_pipeline, name, ns)
    workflow = (obj.get("status") or {}).get("workflow")
    if not workflow:
        err.print(f"error: {ns}/{name} has no workflow yet")
        raise typer.Exit(exitcodes.FAILED)
    found = _cluster_call(cluster.pod_logs, workflow, stage, ns)
    if not found:
        wf = _cluster_call(cluster.get_workflow, workflow, ns)
        root = store or (cluster.store_of(wf) if wf else None) or storage.default_store_uri()
        folder = stage_uri(root, RunIdentity(ns, name, obj["metadata"]["uid"], workflow), stage)
        found = read_archived(folder)
        if not found:
            err.print(f"error: no pods and no archived logs for stage {stage} of {workflow} (looked in {folder}/logs)")
            raise typer.Exit(exitcodes.FAILED)
    for source, text in found:
        out.print(f"==> {source} <==", highlight=False)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


@app.command()
def crd(kind: str = typer.Option("pipeline", help="pipeline (NMMPipeline) or service (NMMService)")) -> None:
    """Print a CustomResourceDefinition (generated from the spec models)."""
    import yaml

    from nmm.spec.crd import crd as pipeline_crd
    from nmm.spec.crd import service_crd

    builds = {"pipeline": pipeline_crd, "service": service_crd}
    if kind not in builds:
        err.print(f"error: --kind: expected pipeline or service, got {kind!r}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    sys.stdout.write(yaml.safe_dump(builds[kind](), sort_keys=False, width=100))


def _batching(key: str):
    from nmm.serve.batcher import BATCHING

    k = BATCHING[key]
    return typer.Option(k.default, k.flag, min=k.lo, max=k.hi, help=k.help)


@app.command()
def serve(
    model: str = typer.Argument(
        ..., help="models:/<name>@<alias>, models:/<name>/<version>, or a published model folder"
    ),
    name: str | None = typer.Option(
        None, "--name", help="The name clients ask for (default: the registered model's, or nmm for a folder)"
    ),
    digest: str | None = typer.Option(
        None,
        "--digest",
        help="A folder's manifest must hold this digest (what the version was registered with; the operator passes it)",
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 in a pod)"),
    port: int = typer.Option(8000, min=1, max=65535),
    store: str | None = typer.Option(None, help="Store URI for store:// folders (default: nmm's store)"),
    max_batch: int = _batching("max_batch"),
    max_wait_ms: float = _batching("max_wait_ms"),
    max_queue: int = _batching("max_queue"),
    header_timeout: float = typer.Option(
        10.0,
        "--header-timeout",
        min=0.1,
        max=300.0,
        help="Seconds a request's line and headers may take to arrive (then the connection closes)",
    ),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", min=0.1, max=600.0, help="Seconds a request's body may take to arrive (then 408)"
    ),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat with images, image generation)."""
    from nmm import storage
    from nmm.serve import http
    from nmm.serve.model_dir import ServeError, load_published
    from nmm.serve.server import create_app

    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,255}", name):
        err.print(f"error: --name: {name[:60]!r} is not a model name (letters, digits, . _ / -)", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        with exits():
            loaded, name = load_published(model, store or storage.default_store_uri(), name=name, digest=digest)
    except ServeError as exc:
        err.print(f"error: MODEL: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    app = create_app(
        loaded, name, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, body_timeout=body_timeout
    )
    out.print(f"serving {name} ({model}) on http://{host}:{port}/v1", highlight=False)
    http.serve(app, host, port, header_timeout)


@app.command()
def ui(host: str = "127.0.0.1", port: int = 5000) -> None:
    """Start the MLflow UI on the local tracking store (or $MLFLOW_TRACKING_URI)."""
    import subprocess

    from nmm import lineage

    argv = lineage.ui_command(host, port)
    err.print(f"MLflow UI on http://{host}:{port} ({lineage.tracking_uri()})")
    raise typer.Exit(subprocess.call(argv))


@gpu_app.command("inventory")
def gpu_inventory(
    label_node: bool = typer.Option(False, "--label-node", help="Label this node ($NODE_NAME) with nmm.dev/gpu.*"),
    interval: int = typer.Option(0, "--interval", help="Repeat every N seconds (0: once)"),
) -> None:
    """Show this machine's NVIDIA GPUs (NVML); with --label-node, label the Kubernetes node."""
    import os
    import time

    from nmm.gpu import inventory, node_labels

    pools = node_labels.pools_from_env()
    while True:
        if label_node:
            node = os.environ.get("NODE_NAME")
            if not node:
                err.print("error: --label-node needs NODE_NAME (the downward API's spec.nodeName)")
                raise typer.Exit(EXIT_BAD_INPUT)
            inv, set_labels = node_labels.label_node(node, pools)
        else:
            inv = inventory.read_gpus()
            set_labels = inventory.labels(inv, pools) if inv else {}
        if inv is None:
            out.print("no NVIDIA GPU / driver found (NVML unavailable); nothing to label")
            raise typer.Exit(0)
        for g in inv.gpus:
            out.print(f"gpu {g.index}: {g.product}, {g.memory_mib} MiB, {'healthy' if g.healthy else 'UNHEALTHY'}")
        out.print(" ".join(f"{k}={v}" for k, v in sorted(set_labels.items())))
        if interval <= 0:
            return
        time.sleep(interval)
