"""Publish a folder of outputs: data objects first, `manifest.json` last (the commit marker)."""

from __future__ import annotations

import hashlib
import json

from nmm.storage.objects import StorageError, exists, join, read_bytes, write_bytes

MANIFEST = "manifest.json"


class IntegrityError(StorageError):
    """A published file's bytes are not the ones its manifest lists (corrupt or tampered)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(folder_uri: str, files: dict[str, bytes], manifest: dict, written: dict[str, bytes] | None = None) -> dict:
    """Write `files` under `folder_uri`, then the manifest listing each with its sha256.
    `written`: files already in the folder (their bytes as written), listed but not rewritten.

    Returns the manifest as written; its `digest` is the sha256 of the canonical file list
    plus the caller's fields, so the same content always gets the same digest.
    """
    listing = {}
    for name in sorted(files):
        data = files[name]
        write_bytes(join(folder_uri, name), data)
        listing[name] = {"sha256": sha256_hex(data), "bytes": len(data)}
    for name, data in sorted((written or {}).items()):
        listing[name] = {"sha256": sha256_hex(data), "bytes": len(data)}
    body = dict(manifest)
    body["files"] = listing
    body.pop("digest", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["digest"] = "sha256:" + sha256_hex(canonical)
    write_bytes(join(folder_uri, MANIFEST), json.dumps(body, indent=2, sort_keys=True).encode())
    return body


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
