"""Publish a folder of outputs: data objects first, `manifest.json` last (the commit marker)."""

from __future__ import annotations

import hashlib
import json

from nmm.storage.objects import AlreadyExists, StorageError, exists, join, read_bytes, write_bytes

MANIFEST = "manifest.json"


class IntegrityError(StorageError):
    """A published file's bytes are not the ones its manifest lists (corrupt or tampered)."""


class PublishConflict(StorageError):
    """Another writer published this folder first, with other contents."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(
    folder_uri: str,
    files: dict[str, bytes],
    manifest: dict,
    written: dict[str, bytes] | None = None,
    *,
    exclusive: bool = False,
) -> dict:
    """Write `files` under `folder_uri`, then the manifest listing each with its sha256.
    `written`: files already in the folder (their bytes as written), listed but not rewritten.

    Returns the manifest as written; its `digest` is the sha256 of the canonical file list
    plus the caller's fields, so the same content always gets the same digest.
    `exclusive`: the manifest is written only if none exists (a conditional write): of two
    writers racing on the folder exactly one commits; the other gets the winner's manifest back
    when it is the same content, else PublishConflict.
    """
    listing = {}
    for name in sorted(files):
        data = files[name]
        _write(join(folder_uri, name), data, exclusive)
        listing[name] = {"sha256": sha256_hex(data), "bytes": len(data)}
    for name, data in sorted((written or {}).items()):
        listing[name] = {"sha256": sha256_hex(data), "bytes": len(data)}
    body = dict(manifest)
    body["files"] = listing
    body.pop("digest", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["digest"] = "sha256:" + sha256_hex(canonical)
    try:
        write_bytes(
            join(folder_uri, MANIFEST), json.dumps(body, indent=2, sort_keys=True).encode(), create_only=exclusive
        )
    except AlreadyExists:
        winner = json.loads(read_bytes(join(folder_uri, MANIFEST)))
        if winner.get("digest") != body["digest"]:
            raise PublishConflict(
                f"{folder_uri} was published by another writer with other contents "
                f"({winner.get('digest')}, not {body['digest']}); refusing to replace it"
            ) from None
        return winner
    return body


def _write(uri: str, data: bytes, exclusive: bool) -> None:
    """A data file of a publish. Exclusive: never over another writer's file; the same bytes
    already there (our own earlier, interrupted attempt, or an identical racer) are kept."""
    try:
        write_bytes(uri, data, create_only=exclusive)
    except AlreadyExists:
        if sha256_hex(read_bytes(uri)) != sha256_hex(data):
            raise PublishConflict(f"{uri} holds another writer's different bytes; refusing to replace them") from None


def read_manifest(folder_uri: str, verify: bool = False) -> dict | None:
    """The folder's manifest, or None when it was never published (or is gone).

    With `verify`, also check that every listed file still exists.
    """
    uri = join(folder_uri, MANIFEST)
    if not exists(uri):
        return None
    manifest = json.loads(read_bytes(uri))
    if verify:
        for name in manifest.get("files", {}):
            if not exists(join(folder_uri, name)):
                return None
    return manifest


def read_file(folder_uri: str, manifest: dict, name: str) -> bytes:
    """Read a published file and check it against the manifest's sha256."""
    data = read_bytes(join(folder_uri, name))
    want = manifest["files"][name]["sha256"]
    if sha256_hex(data) != want:
        raise IntegrityError(f"{join(folder_uri, name)}: content does not match its manifest")
    return data
