"""A JSON merge patch (RFC 7386) applied as the API server applies one: a null member removes the
key, at any depth; a non-object patch replaces. Shared by the Kubernetes emulator and the
in-memory API server of the operator's unit tests."""

from __future__ import annotations


def apply(base, patch):
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = apply(out.get(k), v)
    return out
