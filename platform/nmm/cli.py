"""The `nmm` command line.

    nmm validate FILE        check a pipeline YAML (exit 2 with one line per problem)
    nmm compile FILE         print the Argo Workflow it compiles to
    nmm run FILE             compile and run it here with the embedded local engine
    nmm ui                   the MLflow UI on the local tracking store
    nmm submit FILE          create/update the pipeline on the cluster (kube context)
    nmm status NAME          its status on the cluster
    nmm logs NAME --stage S  a stage's logs (pods, or the copy archived in the store)
    nmm crd                  the NMMPipeline CustomResourceDefinition
    nmm data export          a built-in source as WebDataset shards
    nmm gpu inventory        this machine's GPUs (NVML); --label-node labels the node
    nmm stage NAME …         a stage entrypoint (what Workflow steps run)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from nmm import exitcodes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)
gpu_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="GPU inventory of this machine or node.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Datasets: export a built-in source in the formats users store data in; read a dataset's ledger.")
stage_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Stage entrypoints (run inside Workflow steps).")
app.add_typer(stage_app, name="stage")
app.add_typer(gpu_app, name="gpu")
app.add_typer(data_app, name="data")
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)

EXIT_BAD_INPUT = exitcodes.BAD_INPUT


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
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        return parse_pipeline(text, str(path))
    except SpecError as exc:
        err.print(f"[red]error[/]: {path} is not a valid NMMPipeline ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):")
        for line in exc.problems:
            err.print(f"  {line}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def validate(file: Path = typer.Argument(..., help="Pipeline YAML")) -> None:
    """Validate a pipeline YAML."""
    spec = _load_spec(file)
    out.print(f"{file}: valid NMMPipeline {spec.metadata.name!r} ({spec.spec.model.category}, fusion {spec.spec.model.fusion})")


@app.command("compile")
def compile_(
    file: Path = typer.Argument(..., help="Pipeline YAML"),
    image: Optional[str] = typer.Option(None, help="Platform image for every step"),
    namespace: Optional[str] = typer.Option(None, help="Namespace of the Workflow"),
    store: Optional[str] = typer.Option(None, help="Store URI (s3://bucket/prefix)"),
    service_account: Optional[str] = typer.Option(None, help="Service account of workflow pods"),
) -> None:
    """Print the Argo Workflow (YAML) the pipeline compiles to."""
    from dataclasses import replace

    from nmm.compile import CompileSettings, to_yaml

    spec = _load_spec(file)
    settings = CompileSettings()
    ns = _namespace(spec, namespace, settings.namespace)
    overrides = {k: v for k, v in {"image": image, "namespace": ns, "store_uri": store, "service_account": service_account}.items() if v}
    sys.stdout.write(to_yaml(_compile(spec, replace(settings, **overrides))))


def _namespace(spec, flag: str | None, fallback: str) -> str:
    """The namespace by the one precedence of every command (flag and metadata.namespace must
    agree; either beats the fallback); a contradiction exits 2."""
    from nmm.spec import NamespaceConflict

    try:
        return spec.resolve_namespace(flag, fallback)
    except NamespaceConflict as exc:
        err.print(f"[red]error[/]: {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)


def _compile(spec, settings) -> dict:
    """Compile; a request no GPU pool can hold (or a model too big for it) exits 2."""
    from nmm.compile import compile_pipeline
    from nmm.gpu.pools import PlacementError

    try:
        return compile_pipeline(spec, settings)
    except PlacementError as exc:
        err.print(f"[red]error[/]: {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)


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

    evals = {split_step(n)[1] or "": s for n, s in steps.items()
             if split_step(n)[0] == "evaluate" and s.outputs.get("metrics")}
    if evals:
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
        out.print(f"dataset   {cur.outputs.get('dataset_uri')}  ({cur.outputs.get('cache')}, {cur.outputs.get('dataset_digest')})")
    ro = steps.get("rollout")
    if ro and ro.outputs:
        out.print(f"model     {spec.spec.rollout.registered_model_name} version {ro.outputs.get('version')}: {ro.outputs.get('decision')}")
    fin = steps.get("finalize")
    from nmm import lineage

    if fin and fin.outputs:
        out.print(f"mlflow    {lineage.tracking_uri()}  run {fin.outputs.get('mlflow_run_id')}  (see: nmm ui)")
    out.print(f"logs      {result.folder / 'logs'}")


@app.command()
def run(
    file: Path = typer.Argument(..., help="Pipeline YAML"),
    store: Optional[str] = typer.Option(None, help="Store URI; default .nmm/store, or s3://$NMM_S3_BUCKET when NMM_S3_ENDPOINT is set"),
) -> None:
    """Compile the pipeline and run the compiled Workflow here (embedded local engine)."""
    spec = _load_spec(file)
    from dataclasses import replace

    from nmm import storage
    from nmm.compile import CompileSettings
    from nmm.engine import run_workflow
    from nmm.engine.process import tail
    from nmm.engine.progress import Progress
    from nmm.engine.runner import no_local_effect, workflow_name
    from nmm.home import home_dir

    local = CompileSettings.local(store or storage.default_store_uri())
    workflow = _compile(spec, replace(local, namespace=_namespace(spec, None, local.namespace)))
    ignored = no_local_effect(workflow)
    if ignored:
        err.print(f"[yellow]warning[/]: no local effect (cluster only): {', '.join(ignored)}")
    name = workflow_name(workflow["metadata"]["generateName"])
    steps = [t["name"] for t in workflow["spec"]["templates"][0]["dag"]["tasks"]] + [workflow["spec"]["onExit"]]
    with Progress(name, steps, err) as progress:
        result = run_workflow(workflow, home_dir() / "runs", progress, name=name)
    _summary(result, spec)
    if result.phase != "Succeeded":
        for s in result.steps.values():
            if s.phase == "Failed":
                err.print(f"[red]step {s.name} failed[/] ({s.message}); last lines of {s.logs[-1]}:")
                sys.stderr.write(tail(s.logs[-1]) + "\n")
        raise typer.Exit(exitcodes.FAILED)


def _cluster_call(fn, *args):
    """Run a cluster call; a cluster problem is a clear message and exit 1, not a traceback."""
    from nmm.cluster import ClusterError

    try:
        return fn(*args)
    except ClusterError as exc:
        err.print(f"[red]error[/]: {exc}", highlight=False)
        raise typer.Exit(exitcodes.FAILED)


NamespaceOpt = typer.Option(None, "--namespace", "-n", help="Namespace (default: the kube context's)")


@app.command()
def submit(file: Path = typer.Argument(..., help="Pipeline YAML"), namespace: Optional[str] = NamespaceOpt) -> None:
    """Create or update the pipeline in the current kube context (the operator runs it)."""
    from nmm import cluster

    spec = _load_spec(file)
    ns = _namespace(spec, namespace, cluster.current_namespace())
    action, generation = _cluster_call(cluster.submit, spec, ns)
    out.print(f"nmmpipeline {ns}/{spec.metadata.name} {action} (generation {generation}); follow it: nmm status {spec.metadata.name} -n {ns}")


@app.command()
def status(name: str = typer.Argument(..., help="Pipeline name"), namespace: Optional[str] = NamespaceOpt) -> None:
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
    stage: str = typer.Option(..., "--stage", help="curate, train, evaluate, rollout or finalize "
                              "(train-<variant>, evaluate-<variant> in an ablation)"),
    namespace: Optional[str] = NamespaceOpt,
    store: Optional[str] = typer.Option(None, help="Store URI, when the Workflow is gone too"),
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
        err.print(f"error: --stage must be one of {', '.join(STAGES)} (or train-<variant>, evaluate-<variant>), got {stage!r}")
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
def crd() -> None:
    """Print the NMMPipeline CustomResourceDefinition (generated from the spec models)."""
    import yaml

    from nmm.spec.crd import crd as build

    sys.stdout.write(yaml.safe_dump(build(), sort_keys=False, width=100))


@app.command()
def serve(
    model: str = typer.Argument(..., help="models:/<name>@<alias>, models:/<name>/<version>, or a published model folder"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 in a pod)"),
    port: int = typer.Option(8000, min=1, max=65535),
    store: Optional[str] = typer.Option(None, help="Store URI for store:// folders (default: nmm's store)"),
    max_batch: int = typer.Option(16, "--max-batch", min=1, max=256, help="Requests per model batch at most"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0, max=1000.0, help="How long a request waits for company"),
    max_queue: int = typer.Option(256, "--max-queue", min=1, max=100_000, help="Waiting requests at most; more get 429"),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat with images, image generation)."""
    import uvicorn

    from nmm import storage
    from nmm.lineage import TrackingError
    from nmm.serve.server import ServeError, create_app, load

    try:
        loaded, name = load(model, store or storage.default_store_uri())
    except ServeError as exc:
        err.print(f"error: MODEL: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    except storage.StorageError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.STORE_UNAVAILABLE)
    except TrackingError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exc.exit_code)
    app = create_app(loaded, name, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    out.print(f"serving {name} ({model}) on http://{host}:{port}/v1", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


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


@data_app.command("export")
def data_export(
    source: str = typer.Option(..., "--source", help="A built-in source: digits or shapes"),
    fmt: str = typer.Option("webdataset", "--format", help="Output format: webdataset (tar shards of <key>.png + <key>.json)"),
    out_dir: str = typer.Option(..., "--out", help="Output folder, store://prefix (in nmm's store), or s3://bucket/prefix"),
    samples: int = typer.Option(2000, "--samples", min=1, max=1_000_000, help="How many samples (digits: at most 1,797)"),
    image_size: int = typer.Option(32, "--image-size", min=24, max=256, help="shapes: side of the square image"),
    seed: int = typer.Option(0, "--seed", min=0, help="shapes: the scenes' seed"),
    captions: int = typer.Option(2, "--captions-per-image", min=1, max=8, help="Captions kept per image"),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, max=1_000_000, help="Samples per shard"),
) -> None:
    """Write a built-in source as WebDataset shards: the format nmm reads users' data in."""
    from nmm import storage
    from nmm.data import export

    if fmt not in export.FORMATS:
        err.print(f"error: --format: expected one of {', '.join(export.FORMATS)}, got {fmt!r}")
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        data = export.load_source(source, samples, image_size, seed, captions)
    except ValueError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    out_uri = out_dir if "://" in out_dir else Path(out_dir).resolve().as_uri()
    out_uri = storage.in_store(out_uri, storage.default_store_uri())
    try:
        shards = export.export_webdataset(data, out_uri, shard_size)
    except storage.StorageError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.STORE_UNAVAILABLE)
    out.print(f"wrote {len(data.images)} {source} samples in {len(shards)} WebDataset shard(s) under {out_uri}")


def _dataset_uri(run: str) -> str:
    """A dataset URI as given, or the one a local run's curate step published."""
    import json

    from nmm import storage
    from nmm.home import home_dir

    if "://" in run:
        return storage.in_store(run, storage.default_store_uri())
    status = home_dir() / "runs" / run / "status.json"
    if not status.is_file():
        err.print(f"error: RUN: no local run {run!r} (under {home_dir() / 'runs'}); give a run name or a dataset URI")
        raise typer.Exit(EXIT_BAD_INPUT)
    steps = json.loads(status.read_text()).get("steps", {})
    # a curate RayJob (data.ray) hands its outputs to the `curate-outputs` step
    uri = next((steps.get(s, {}).get("outputs", {}).get("dataset_uri") for s in ("curate", "curate-outputs")
                if steps.get(s, {}).get("outputs", {}).get("dataset_uri")), None)
    if not uri:
        err.print(f"error: run {run!r} has no curated dataset (its curate step did not finish)")
        raise typer.Exit(exitcodes.FAILED)
    return uri


@data_app.command("ledger")
def data_ledger(
    run: str = typer.Argument(..., help="A local run's name (nmm run prints it), or a dataset URI"),
    reason: Optional[str] = typer.Option(None, "--reason", help="Only rows dropped for this reason (or 'keep')"),
    rows: int = typer.Option(20, "--rows", min=0, max=100_000, help="How many rows to print"),
) -> None:
    """Every input sample's fate: counts per source and reason, then rows."""
    import pyarrow.compute as pc
    from rich.table import Table

    from nmm import storage
    from nmm.data import ledger

    if reason is not None and reason not in (*ledger.REASONS, "keep"):
        err.print(f"error: --reason: expected keep or one of {', '.join(ledger.REASONS)}, got {reason!r}")
        raise typer.Exit(EXIT_BAD_INPUT)
    uri = _dataset_uri(run)
    try:
        manifest = storage.read_manifest(uri, verify=False)
        if manifest is None or ledger.FILE not in manifest.get("files", {}):
            err.print(f"error: no ledger at {uri} (curated by an older nmm, or not a dataset)")
            raise typer.Exit(EXIT_BAD_INPUT)
        table = ledger.from_bytes(storage.read_file(uri, manifest, ledger.FILE))
    except storage.StorageError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.STORE_UNAVAILABLE)
    counts = ledger.counts(table)
    summary = Table("source", "samples", "kept", title=f"ledger of {uri}")
    for name, c in counts["sources"].items():
        summary.add_row(name, str(c["samples"]), str(c["kept"]))
    out.print(summary)
    out.print("dropped: " + (", ".join(f"{r} {n}" for r, n in counts["dropped_by_reason"].items() if n) or "none"))
    if reason == "keep":
        table = table.filter(pc.is_null(table["reason"]))
    elif reason:
        table = table.filter(pc.equal(table["reason"], reason))
    picked = table.slice(0, rows).to_pylist()
    listing = Table("source", "key", "decision", "reason", "duplicate_of", "split", "detail")
    for r in picked:
        listing.add_row(*(str(r[c] or "") for c in ("source", "key", "decision", "reason", "duplicate_of", "split", "detail")))
    if picked:
        out.print(listing)


# --- stage entrypoints --------------------------------------------------------------------

SpecOpt = typer.Option(..., "--spec", help="The pipeline spec as JSON (compiled into the step)")
RunOpt = typer.Option(..., "--run-id", help="The pipeline run (the Workflow's name)")
NsOpt = typer.Option(..., "--namespace", help="The run's namespace (part of its identity)")
OwnerOpt = typer.Option(..., "--owner-uid", help="UID of the run's owner: the NMMPipeline, or the Workflow itself")
StoreOpt = typer.Option(..., "--store", help="Store URI")
OutputsOpt = typer.Option(..., "--outputs", help="Folder for output parameters")
VariantOpt = typer.Option(None, "--variant", help="The ablation variant this step trains or evaluates")


def _stage(name: str, fn, ident: dict, variant: str | None = None, **kw) -> None:
    """Run a stage with its log archived to the store. Exit codes (R17): bad input 2, outputs
    that belong to another spec 3; an unreachable store or MLflow 129/130 (retryable)."""
    from nmm.data.dataset import DatasetError
    from nmm.data.locate import SourceError
    from nmm.lineage import TrackingError
    from nmm.spec import SpecError
    from nmm.lineage import RegistryConflict
    from nmm.stages.context import ModelMissing, OutputsConflict, StageContext, UnknownVariant
    from nmm.stages.logs import Archive
    from nmm.storage import StorageError

    try:
        ctx = StageContext.create(variant=variant, **ident)
    except SpecError as exc:
        err.print("error: invalid --spec:\n  " + "\n  ".join(exc.problems), markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    except (UnknownVariant, ValueError) as exc:  # a variant or an identity part that cannot be
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        with Archive(ctx.stage_uri(ctx.step(name))):
            code = fn(ctx, **kw)
    except (DatasetError, ModelMissing, SourceError) as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    except (OutputsConflict, RegistryConflict) as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.CONFLICT)
    except StorageError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.STORE_UNAVAILABLE)
    except TrackingError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exc.exit_code)
    raise typer.Exit(code or 0)


def _ident(spec: str, namespace: str, owner_uid: str, run_id: str, store: str, outputs: str) -> dict:
    return dict(spec_json=spec, namespace=namespace, owner_uid=owner_uid, run_id=run_id, store=store, outputs=outputs)


@stage_app.command("curate")
def stage_curate(spec: str = SpecOpt, namespace: str = NsOpt, owner_uid: str = OwnerOpt, run_id: str = RunOpt,
                 store: str = StoreOpt, outputs: str = OutputsOpt,
                 outputs_uri: Optional[str] = typer.Option(None, "--outputs-uri", help="Also write the output parameters "
                                                           "here, as JSON (a RayJob's driver: see `nmm stage curate-outputs`)")) -> None:
    """Curate: sources → decode, filter, dedup → split → tokenizers → shards, ledger, data card + manifest."""
    from nmm.stages import curate

    _stage("curate", curate.run, _ident(spec, namespace, owner_uid, run_id, store, outputs) | {"outputs_uri": outputs_uri})


@stage_app.command("curate-outputs")
def stage_curate_outputs(source: str = typer.Option(..., "--from", help="The JSON a RayJob's curate driver wrote (--outputs-uri)"),
                  outputs: str = OutputsOpt) -> None:
    """Read the curate RayJob's output parameters back from the store (a resource step has none)."""
    import json

    from nmm import storage

    try:
        values = json.loads(storage.read_bytes(source))
    except storage.StorageError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.STORE_UNAVAILABLE)
    except ValueError:
        err.print(f"error: --from: {source} is not the JSON of output parameters")
        raise typer.Exit(EXIT_BAD_INPUT)
    folder = Path(outputs)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dataset_uri", "dataset_digest", "cache"):
        if not isinstance(values.get(name), str):
            err.print(f"error: {source} has no {name!r}")
            raise typer.Exit(EXIT_BAD_INPUT)
        (folder / name).write_text(values[name])


@stage_app.command("train")
def stage_train(spec: str = SpecOpt, namespace: str = NsOpt, owner_uid: str = OwnerOpt, run_id: str = RunOpt,
                store: str = StoreOpt, outputs: str = OutputsOpt,
                dataset_uri: str = typer.Option(..., "--dataset-uri"), variant: str = VariantOpt) -> None:
    """Train the model (one process, or one of many under torchrun)."""
    from nmm.stages import train

    _stage("train", train.run, _ident(spec, namespace, owner_uid, run_id, store, outputs), variant, dataset_uri=dataset_uri)


@stage_app.command("evaluate")
def stage_evaluate(spec: str = SpecOpt, namespace: str = NsOpt, owner_uid: str = OwnerOpt, run_id: str = RunOpt,
                   store: str = StoreOpt, outputs: str = OutputsOpt,
                   dataset_uri: str = typer.Option(..., "--dataset-uri"), model_uri: str = typer.Option(..., "--model-uri"),
                   variant: str = VariantOpt) -> None:
    """Evaluate the model on held-out data and decide the gates."""
    from nmm.stages import evaluate

    _stage("evaluate", evaluate.run, _ident(spec, namespace, owner_uid, run_id, store, outputs), variant,
           dataset_uri=dataset_uri, model_uri=model_uri)


@stage_app.command("rollout")
def stage_rollout(spec: str = SpecOpt, namespace: str = NsOpt, owner_uid: str = OwnerOpt, run_id: str = RunOpt,
                  store: str = StoreOpt, outputs: str = OutputsOpt,
                  model_uri: str = typer.Option(..., "--model-uri"), metrics: str = typer.Option(..., "--metrics"),
                  gate: str = typer.Option(..., "--gate")) -> None:
    """Register the model version; move `champion` when it earns it."""
    from nmm.stages import rollout

    _stage("rollout", rollout.run, _ident(spec, namespace, owner_uid, run_id, store, outputs),
           model_uri=model_uri, metrics_json=metrics, gate=gate)


@stage_app.command("finalize")
def stage_finalize(spec: str = SpecOpt, namespace: str = NsOpt, owner_uid: str = OwnerOpt, run_id: str = RunOpt,
                   store: str = StoreOpt, outputs: str = OutputsOpt,
                   status: str = typer.Option(..., "--status")) -> None:
    """Close the pipeline's MLflow parent run (the Workflow's onExit handler)."""
    from nmm.stages import finalize

    _stage("finalize", finalize.run, _ident(spec, namespace, owner_uid, run_id, store, outputs), status=status)
