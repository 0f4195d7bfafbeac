"""`nmm stage NAME`: the stage entrypoints Workflow steps run (the spec and the run's identity on
the command line; exit codes per R17)."""

from __future__ import annotations

from pathlib import Path

import typer

from nmm import exitcodes
from nmm.cli.output import EXIT_BAD_INPUT, err, exits

stage_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Stage entrypoints (run inside Workflow steps).",
)


SpecOpt = typer.Option(..., "--spec", help="The pipeline spec as JSON (compiled into the step)")
RunOpt = typer.Option(..., "--run-id", help="The pipeline run (the Workflow's name)")
NsOpt = typer.Option(..., "--namespace", help="The run's namespace (part of its identity)")
OwnerOpt = typer.Option(..., "--owner-uid", help="UID of the run's owner: the NMMPipeline, or the Workflow itself")
StoreOpt = typer.Option(..., "--store", help="Store URI")
OutputsOpt = typer.Option(..., "--outputs", help="Folder for output parameters")
VariantOpt = typer.Option(None, "--variant", help="The ablation variant this step trains or evaluates")


def _stage(name: str, fn, ident: dict, variant: str | None = None, **kw) -> None:
    """Run a stage with its log archived to the store. Exit codes (R17): bad input 2, outputs
    that belong to another spec 3; an unreachable store, MLflow or Kubernetes API 129/130/131
    (retryable); a Kubernetes API that refuses (403, 422) 1."""
    from nmm.data.dataset import DatasetError
    from nmm.data.locate import SourceError
    from nmm.lineage import RegistryConflict
    from nmm.rollout.probe import ProbeError
    from nmm.spec import SpecError
    from nmm.stages.context import ModelMissing, OutputsConflict, StageContext, UnknownVariant
    from nmm.stages.logs import Archive
    from nmm.stages.rollout_serving import ClusterRefused

    try:
        ctx = StageContext.create(variant=variant, **ident)
    except SpecError as exc:
        err.print("error: invalid --spec:\n  " + "\n  ".join(exc.problems), markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (UnknownVariant, ValueError) as exc:  # a variant or an identity part that cannot be
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        with exits(), Archive(ctx.stage_uri(ctx.step(name))):  # an unreachable store or MLflow: 129/130
            code = fn(ctx, **kw)
    except (DatasetError, ModelMissing, SourceError, ProbeError) as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except ClusterRefused as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.CLUSTER_UNAVAILABLE if exc.retryable else exitcodes.FAILED) from None
    except (OutputsConflict, RegistryConflict) as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.CONFLICT) from None
    raise typer.Exit(code or 0)


def _ident(spec: str, namespace: str, owner_uid: str, run_id: str, store: str, outputs: str) -> dict:
    return dict(spec_json=spec, namespace=namespace, owner_uid=owner_uid, run_id=run_id, store=store, outputs=outputs)


@stage_app.command("curate")
def stage_curate(
    spec: str = SpecOpt,
    namespace: str = NsOpt,
    owner_uid: str = OwnerOpt,
    run_id: str = RunOpt,
    store: str = StoreOpt,
    outputs: str = OutputsOpt,
    outputs_uri: str | None = typer.Option(
        None,
        "--outputs-uri",
        help="Also write the output parameters here, as JSON (a RayJob's driver: see `nmm stage curate-outputs`)",
    ),
) -> None:
    """Curate: sources → decode, filter, dedup → split → tokenizers → shards, ledger, data card + manifest."""
    from nmm.stages import curate

    _stage(
        "curate", curate.run, _ident(spec, namespace, owner_uid, run_id, store, outputs) | {"outputs_uri": outputs_uri}
    )


@stage_app.command("curate-outputs")
def stage_curate_outputs(
    source: str = typer.Option(..., "--from", help="The JSON a RayJob's curate driver wrote (--outputs-uri)"),
    outputs: str = OutputsOpt,
) -> None:
    """Read the curate RayJob's output parameters back from the store (a resource step has none)."""
    import json

    from nmm import storage

    try:
        with exits():
            values = json.loads(storage.read_bytes(source))
    except ValueError:
        err.print(f"error: --from: {source} is not the JSON of output parameters")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    folder = Path(outputs)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dataset_uri", "dataset_digest", "cache"):
        if not isinstance(values.get(name), str):
            err.print(f"error: {source} has no {name!r}")
            raise typer.Exit(EXIT_BAD_INPUT)
        (folder / name).write_text(values[name])


@stage_app.command("train")
def stage_train(
    spec: str = SpecOpt,
    namespace: str = NsOpt,
    owner_uid: str = OwnerOpt,
    run_id: str = RunOpt,
    store: str = StoreOpt,
    outputs: str = OutputsOpt,
    dataset_uri: str = typer.Option(..., "--dataset-uri"),
    variant: str = VariantOpt,
) -> None:
    """Train the model (one process, or one of many under torchrun)."""
    from nmm.stages import train

    _stage(
        "train", train.run, _ident(spec, namespace, owner_uid, run_id, store, outputs), variant, dataset_uri=dataset_uri
    )


@stage_app.command("evaluate")
def stage_evaluate(
    spec: str = SpecOpt,
    namespace: str = NsOpt,
    owner_uid: str = OwnerOpt,
    run_id: str = RunOpt,
    store: str = StoreOpt,
    outputs: str = OutputsOpt,
    dataset_uri: str = typer.Option(..., "--dataset-uri"),
    model_uri: str = typer.Option(..., "--model-uri"),
    variant: str = VariantOpt,
) -> None:
    """Evaluate the model on held-out data and decide the gates."""
    from nmm.stages import evaluate

    _stage(
        "evaluate",
        evaluate.run,
        _ident(spec, namespace, owner_uid, run_id, store, outputs),
        variant,
        dataset_uri=dataset_uri,
        model_uri=model_uri,
    )


@stage_app.command("rollout")
def stage_rollout(
    spec: str = SpecOpt,
    namespace: str = NsOpt,
    owner_uid: str = OwnerOpt,
    run_id: str = RunOpt,
    store: str = StoreOpt,
    outputs: str = OutputsOpt,
    model_uri: str = typer.Option(..., "--model-uri"),
    metrics: str = typer.Option(..., "--metrics"),
    gate: str = typer.Option(..., "--gate"),
) -> None:
    """Register the model version; move `champion` when it earns it."""
    from nmm.stages import rollout

    _stage(
        "rollout",
        rollout.run,
        _ident(spec, namespace, owner_uid, run_id, store, outputs),
        model_uri=model_uri,
        metrics_json=metrics,
        gate=gate,
    )


@stage_app.command("finalize")
def stage_finalize(
    spec: str = SpecOpt,
    namespace: str = NsOpt,
    owner_uid: str = OwnerOpt,
    run_id: str = RunOpt,
    store: str = StoreOpt,
    outputs: str = OutputsOpt,
    status: str = typer.Option(..., "--status"),
) -> None:
    """Close the pipeline's MLflow parent run (the Workflow's onExit handler)."""
    from nmm.stages import finalize

    _stage("finalize", finalize.run, _ident(spec, namespace, owner_uid, run_id, store, outputs), status=status)
