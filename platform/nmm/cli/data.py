"""`nmm data`: a built-in source written as WebDataset shards, and a dataset's per-sample ledger."""

from __future__ import annotations

import typer

from nmm import exitcodes
from nmm.cli.output import EXIT_BAD_INPUT, err, exits, out

data_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Datasets: export a built-in source in the formats users store data in; read a dataset's ledger.",
)


@data_app.command("export")
def data_export(
    source: str = typer.Option(..., "--source", help="A built-in source: digits or shapes"),
    fmt: str = typer.Option(
        "webdataset", "--format", help="Output format: webdataset (tar shards of <key>.png + <key>.json)"
    ),
    out_dir: str = typer.Option(
        ..., "--out", help="Output folder, store://prefix (in nmm's store), or s3://bucket/prefix"
    ),
    samples: int = typer.Option(
        2000, "--samples", min=1, max=1_000_000, help="How many samples (digits: at most 1,797)"
    ),
    image_size: int = typer.Option(32, "--image-size", min=24, max=256, help="shapes: side of the square image"),
    seed: int = typer.Option(0, "--seed", min=0, help="shapes: the scenes' seed"),
    captions: int = typer.Option(2, "--captions-per-image", min=1, max=8, help="Captions kept per image"),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, max=1_000_000, help="Samples per shard"),
) -> None:
    """Write a built-in source as WebDataset shards: the format nmm reads users' data in."""
    from nmm import storage
    from nmm.data import export, kinds

    if source not in kinds.BUILT_IN:
        err.print(f"error: --source: expected one of {', '.join(kinds.BUILT_IN)}, got {source!r}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    if fmt not in export.FORMATS:
        err.print(f"error: --format: expected one of {', '.join(export.FORMATS)}, got {fmt!r}")
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        data = export.load_source(source, samples, image_size, seed, captions)
    except ValueError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    out_uri = storage.in_store(storage.uri_of(out_dir), storage.default_store_uri())
    with exits():
        shards = export.export_webdataset(data, out_uri, shard_size)
    out.print(f"wrote {len(data.images)} {source} samples in {len(shards)} WebDataset shard(s) under {out_uri}")


def _dataset_uri(run: str) -> str:
    """A dataset URI as given, or the one a local run's curate step published."""
    from nmm import storage
    from nmm.home import home_dir

    if "://" in run:
        return storage.in_store(run, storage.default_store_uri())
    from nmm.engine import state

    folder = state.run_folder(home_dir() / "runs", run)
    try:
        record = state.read_status(folder) if folder is not None else None
    except state.CorruptRecord as exc:
        err.print(f"error: RUN: {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if record is None:
        err.print(f"error: RUN: no local run {run!r} (under {home_dir() / 'runs'}); give a run name or a dataset URI")
        raise typer.Exit(EXIT_BAD_INPUT)
    steps = record.get("steps", {}) if isinstance(record.get("steps"), dict) else {}
    # a curate RayJob (data.ray) hands its outputs to the `curate-outputs` step
    uri = next(
        (
            steps.get(s, {}).get("outputs", {}).get("dataset_uri")
            for s in ("curate", "curate-outputs")
            if steps.get(s, {}).get("outputs", {}).get("dataset_uri")
        ),
        None,
    )
    if not uri:
        err.print(f"error: run {run!r} has no curated dataset (its curate step did not finish)")
        raise typer.Exit(exitcodes.FAILED)
    return uri


@data_app.command("ledger")
def data_ledger(
    run: str = typer.Argument(..., help="A local run's name (nmm run prints it), or a dataset URI"),
    reason: str | None = typer.Option(None, "--reason", help="Only rows dropped for this reason (or 'keep')"),
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
    with exits():
        manifest = storage.read_manifest(uri, verify=False)
        if manifest is None or ledger.FILE not in manifest.get("files", {}):
            err.print(f"error: no ledger at {uri} (curated by an older nmm, or not a dataset)")
            raise typer.Exit(EXIT_BAD_INPUT)
        table = ledger.from_bytes(storage.read_file(uri, manifest, ledger.FILE))
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
        listing.add_row(
            *(str(r[c] or "") for c in ("source", "key", "decision", "reason", "duplicate_of", "split", "detail"))
        )
    if picked:
        out.print(listing)
