"""`nmm promote` and `nmm rollback`: what an NMMService serves, by hand, without a canary (the
operator records it as PromotedByHand). For a service the command only asks (the service's spec
names the version, `nmm.dev/promote` says "at once"); the operator serves it and then moves the
registry's `champion` to it — one writer, so two commands racing cannot leave the champion on a
version that is not served. `--model-only` moves the alias of a registered model that no
NMMService serves."""

from __future__ import annotations

import typer

from nmm import exitcodes
from nmm.cli.output import EXIT_BAD_INPUT, err, exits, out


def _service(name: str, namespace: str | None) -> tuple[dict, str]:
    from nmm import cluster

    ns = namespace or cluster.current_namespace()
    try:
        svc = cluster.get_service(name, ns)
    except cluster.ClusterError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.FAILED) from None
    if svc is None:
        err.print(
            f"error: NAME: no NMMService {ns}/{name} (use --model-only to move the registry alias alone)", markup=False
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    return svc, ns


def _known(model: str, version: int) -> None:
    from nmm import lineage

    with exits():
        if lineage.model_version(model, str(version)) is None:
            err.print(f"error: VERSION: {model} has no version {version}", markup=False)
            raise typer.Exit(EXIT_BAD_INPUT)


def _move_champion(model: str, version: int) -> None:
    from nmm import lineage

    _known(model, version)
    with exits():
        lineage.promote(model, str(version), "champion", {"nmm.serving.decision": "promoted_by_hand"})
    out.print(f"{model}: champion → version {version}", highlight=False)


def _serve(name: str, ns: str, version: int) -> None:
    from nmm import cluster

    try:
        cluster.serve_version(name, ns, version, at_once=True)
    except cluster.ClusterError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exitcodes.FAILED) from None
    out.print(
        f"NMMService {ns}/{name}: asked to serve version {version} at once (no canary); the operator moves champion "
        f"once it serves it; watch: kubectl get nmms {name} -n {ns} -w",
        highlight=False,
    )


def promote(
    name: str = typer.Argument(..., help="An NMMService (or, with --model-only, a registered model)"),
    version: int = typer.Argument(..., min=1, help="The registered version to promote"),
    namespace: str | None = typer.Option(
        None, "--namespace", "-n", help="The NMMService's namespace (default: the kube context's)"
    ),
    model_only: bool = typer.Option(
        False, "--model-only", help="NAME is a registered model: move its champion alias only"
    ),
) -> None:
    """Make VERSION the champion and serve it at once, skipping the canary."""
    if model_only:
        _move_champion(name, version)
        return
    svc, ns = _service(name, namespace)
    _known(svc["spec"]["model"]["name"], version)
    _serve(name, ns, version)


def rollback(
    name: str = typer.Argument(..., help="An NMMService (or, with --model-only, a registered model)"),
    to: int | None = typer.Option(
        None, "--to", min=1, help="The version to go back to (default: the one served before)"
    ),
    namespace: str | None = typer.Option(
        None, "--namespace", "-n", help="The NMMService's namespace (default: the kube context's)"
    ),
    model_only: bool = typer.Option(
        False, "--model-only", help="NAME is a registered model: move its champion alias to --to"
    ),
) -> None:
    """Stop a canary in progress, or go back to the version served before (champion moves too)."""
    if model_only:
        if to is None:
            err.print("error: --to: a registered model alone keeps no history; name the version to go back to")
            raise typer.Exit(EXIT_BAD_INPUT)
        _move_champion(name, to)
        return
    svc, ns = _service(name, namespace)
    status = svc.get("status") or {}
    if to is None and status.get("canaryVersion") is not None:
        to = status.get("stableVersion")  # a canary in progress: all traffic back to stable, champion unchanged
        _serve(name, ns, to)
        return
    to = to or status.get("previousStableVersion")
    if to is None:
        err.print(f"error: NMMService {ns}/{name} has served no other version; name one with --to", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    _known(svc["spec"]["model"]["name"], to)
    _serve(name, ns, to)
