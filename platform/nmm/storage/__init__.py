"""The only module that talks to object storage.

Objects are named by URI: `file:///abs/folder/key` for a local folder (the default store is
`.nmm/store`) or `s3://bucket/key` for S3/MinIO, reached with the `minio` client when
`NMM_S3_ENDPOINT` is set (credentials from `NMM_S3_ACCESS_KEY`/`NMM_S3_SECRET_KEY`, or
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`).

A folder of outputs exists only once its `manifest.json` does: `publish` writes the data
objects first and the manifest last, so a reader never sees half a folder.
"""

from nmm.storage.objects import (
    AlreadyExists,
    ObjectInfo,
    StorageError,
    TooLarge,
    default_store_uri,
    delete,
    exists,
    in_store,
    join,
    list_names,
    list_objects,
    open_read,
    open_seekable,
    read_bytes,
    read_json,
    resolves_within,
    stat,
    uri_of,
    write_bytes,
    write_json,
)
from nmm.storage.publish import MANIFEST, IntegrityError, PublishConflict, publish, read_file, read_manifest, sha256_hex

__all__ = [
    "TooLarge",
    "open_read",
    "open_seekable",
    "resolves_within",
    "AlreadyExists",
    "IntegrityError",
    "PublishConflict",
    "MANIFEST",
    "ObjectInfo",
    "StorageError",
    "default_store_uri",
    "delete",
    "exists",
    "in_store",
    "join",
    "list_names",
    "list_objects",
    "publish",
    "read_bytes",
    "read_file",
    "read_json",
    "read_manifest",
    "sha256_hex",
    "stat",
    "uri_of",
    "write_bytes",
    "write_json",
]
