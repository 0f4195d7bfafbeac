"""Read, write and test objects by URI, on a local folder or S3/MinIO."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from nmm.home import home_dir


class StorageError(RuntimeError):
    """An object could not be read or written."""


class AlreadyExists(StorageError):
    """A create-only write found its key taken: another writer got there first."""


# Every S3 call: bounded waits (a store that hangs fails, it does not stall a stage for the
# client's default 5 minutes a try) and retries with exponential backoff on 500/502/503/504 and
# on connection errors and timeouts (0.25, 0.5, 1, 2, 4 s: about 8 s before "unreachable").
# Seconds, overridable for tests.
S3_TIMEOUT_S = float(os.environ.get("NMM_S3_TIMEOUT_S", "60"))
S3_RETRIES = int(os.environ.get("NMM_S3_RETRIES", "5"))
S3_BACKOFF_S = 0.25


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its URI, size and version tag (the S3 ETag; a local file's size and mtime)."""

    uri: str
    size: int
    etag: str


def default_store_uri() -> str:
    """`s3://$NMM_S3_BUCKET` when an S3 endpoint is configured, else `file://<cwd>/.nmm/store`."""
    if os.environ.get("NMM_STORE"):
        return os.environ["NMM_STORE"].rstrip("/")
    if os.environ.get("NMM_S3_ENDPOINT"):
        return f"s3://{os.environ.get('NMM_S3_BUCKET', 'nmm')}"
    return (home_dir() / "store").as_uri()


def uri_of(location: str) -> str:
    """A URI as given (s3://, file://, store://); a path as the file:// URI of its absolute path,
    written as is (not %-escaped, so a glob's wildcards stay wildcards)."""
    if location.startswith(("s3://", "file://", "store://")):
        return location
    path = os.path.normpath(os.path.join(os.getcwd(), location))
    return f"file://{path}" + ("/" if location.endswith("/") else "")


def in_store(uri: str, store: str) -> str:
    """`store://key` as the URI of `key` in the given store; any other URI as it is."""
    return join(store, uri[len("store://") :]) if uri.startswith("store://") else uri


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def _split(uri: str) -> tuple[str, str, str]:
    u = urlparse(uri)
    if u.scheme == "file":
        return "file", "", u.path
    if u.scheme == "s3":
        return "s3", u.netloc, u.path.lstrip("/")
    raise StorageError(f"unsupported storage URI {uri!r}: expected file:///… or s3://bucket/…")


@lru_cache(maxsize=4)
def _minio(endpoint: str, access: str, secret: str, secure: bool, region: str):
    import certifi
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(S3_TIMEOUT_S, 10.0), read=S3_TIMEOUT_S),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=S3_RETRIES, backoff_factor=S3_BACKOFF_S, status_forcelist=[500, 502, 503, 504], allowed_methods=None
        ),  # every S3 call nmm makes is idempotent (create-only puts too)
    )
    return Minio(endpoint, access_key=access, secret_key=secret, secure=secure, region=region, http_client=http)


def s3_client():
    endpoint = os.environ.get("NMM_S3_ENDPOINT")
    if not endpoint:
        raise StorageError("s3:// URIs need NMM_S3_ENDPOINT (host:port or URL of MinIO/S3)")
    secure = endpoint.startswith("https://") or os.environ.get("NMM_S3_SECURE", "") == "true"
    endpoint = endpoint.split("://", 1)[-1].rstrip("/")
    access = os.environ.get("NMM_S3_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = os.environ.get("NMM_S3_SECRET_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    region = os.environ.get("NMM_S3_REGION", "us-east-1")
    return _minio(endpoint, access, secret, secure, region)


def write_bytes(uri: str, data: bytes, *, create_only: bool = False) -> None:
    """Write one object atomically: readers see the old object or the whole new one.
    `create_only`: only if the key is free (S3's conditional write, If-None-Match: *; a hard
    link on a file system), else AlreadyExists: of two racing writers exactly one wins."""
    scheme, bucket, key = _split(uri)
    if scheme == "file":
        _write_file(Path(key), data, create_only, uri)
        return
    client = s3_client()
    from minio.error import S3Error

    try:
        if create_only:  # (put_object would send the condition as user metadata)
            client._put_object(
                bucket, key, data, headers={"If-None-Match": "*", "Content-Type": "application/octet-stream"}
            )
        else:
            client.put_object(bucket, key, io.BytesIO(data), len(data))
    except S3Error as exc:
        if exc.code in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise AlreadyExists(f"{uri} exists: another writer created it first") from exc
        raise StorageError(f"cannot write {uri}: {exc}") from exc
    except Exception as exc:  # urllib3 errors after the retries, …
        raise StorageError(f"cannot write {uri}: {exc}") from exc


def _write_file(path: Path, data: bytes, create_only: bool, uri: str) -> None:
    """Temporary file, fsync, then rename (or link): a full disk or a crash leaves the old object,
    never a partial one; the temporary file is removed either way."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if create_only:
            try:
                os.link(tmp, path)  # atomic, and fails if the name is taken
            except FileExistsError:
                raise AlreadyExists(f"{uri} exists: another writer created it first") from None
        else:
            os.replace(tmp, path)
    except OSError as exc:  # ENOSPC, EDQUOT, EIO, …
        raise StorageError(f"cannot write {uri}: {exc.strerror}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


class TooLarge(ValueError):
    """An object over the size its reader allows (bad data, not an outage)."""


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The object's bytes; TooLarge when it holds more than `max_bytes` (known before reading
    when the store says its size, else after reading at most max_bytes + 1)."""
    with open_read(uri) as (f, size):
        if max_bytes is not None and size is not None and size > max_bytes:
            raise TooLarge(f"{uri} is {size} bytes, over the {max_bytes}-byte limit")
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except Exception as exc:  # a connection cut mid-object: the store's fault, retryable
            raise StorageError(f"cannot read {uri}: {exc}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(f"{uri} is over the {max_bytes}-byte limit")
    return data


@contextlib.contextmanager
def open_read(uri: str):
    """(a binary stream of the object, its size when the store says it): read as it arrives,
    never whole into memory."""
    scheme, bucket, key = _split(uri)
    if scheme == "file":
        try:
            f = open(key, "rb")
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror}") from exc
        with f:
            yield f, os.fstat(f.fileno()).st_size
        return
    try:
        resp = s3_client().get_object(bucket, key)
    except Exception as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc
    try:
        size = resp.headers.get("Content-Length")
        yield resp, int(size) if size and size.isdigit() else None
    finally:
        resp.close()
        resp.release_conn()


class _Ranges(io.RawIOBase):
    """An S3 object as a seekable file: each read one ranged GET (Parquet reads its footer, then
    the row groups it is asked for, never the whole object)."""

    def __init__(self, uri: str, bucket: str, key: str, size: int):
        self.uri, self.bucket, self.key, self.size, self.pos = uri, bucket, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        n = min(len(buf), max(0, self.size - self.pos))
        if not n:
            return 0
        try:
            resp = s3_client().get_object(self.bucket, self.key, offset=self.pos, length=n)
            try:
                data = resp.read()
            finally:
                resp.close()
                resp.release_conn()
        except Exception as exc:
            raise StorageError(f"cannot read {self.uri}: {exc}") from exc
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


@contextlib.contextmanager
def open_seekable(uri: str):
    """A seekable binary file of the object (local: the file; S3: ranged reads)."""
    scheme, bucket, key = _split(uri)
    if scheme == "file":
        with open_read(uri) as (f, _):
            yield f
        return
    info = stat(uri)
    if info is None:
        raise StorageError(f"cannot read {uri}: it does not exist")
    with io.BufferedReader(_Ranges(uri, bucket, key, info.size), buffer_size=1 << 20) as f:
        yield f


def resolves_within(uri: str, root_uri: str) -> bool:
    """Whether a local object, its symlinks followed, lies under `root_uri` (an S3 key has no
    symlinks: always). A source's reader refuses what resolves outside its root."""
    scheme, _, key = _split(uri)
    if scheme != "file":
        return True
    root = os.path.realpath(_split(root_uri)[2])
    real = os.path.realpath(key)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def exists(uri: str) -> bool:
    scheme, bucket, key = _split(uri)
    if scheme == "file":
        return Path(key).is_file()
    from minio.error import S3Error

    try:
        s3_client().stat_object(bucket, key)
        return True
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
            return False
        raise StorageError(f"cannot stat {uri}: {exc}") from exc
    except Exception as exc:  # the store did not answer (after the retries): "cannot tell", never "absent"
        raise StorageError(f"cannot stat {uri}: {exc}") from exc


def delete(uri: str) -> None:
    scheme, bucket, key = _split(uri)
    if scheme == "file":
        Path(key).unlink(missing_ok=True)
        return
    try:
        s3_client().remove_object(bucket, key)
    except Exception as exc:
        raise StorageError(f"cannot delete {uri}: {exc}") from exc


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def list_names(folder_uri: str) -> list[str]:
    """Names of the objects directly under a folder (small folders such as logs/ only: data is
    found through manifests, never by listing a bucket)."""
    scheme, bucket, key = _split(folder_uri)
    if scheme == "file":
        path = Path(key)
        return (
            sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if path.is_dir()
            else []
        )
    prefix = key.rstrip("/") + "/"
    try:
        return sorted(
            o.object_name[len(prefix) :] for o in s3_client().list_objects(bucket, prefix=prefix) if not o.is_dir
        )
    except Exception as exc:
        raise StorageError(f"cannot list {folder_uri}: {exc}") from exc


def _file_info(path: Path) -> ObjectInfo:
    st = path.stat()
    return ObjectInfo(f"file://{path}", st.st_size, f"{st.st_size}-{st.st_mtime_ns}")  # the path as is: no %-escapes


def list_objects(prefix_uri: str) -> list[ObjectInfo]:
    """Every object under a prefix, at any depth, sorted by URI (hidden files and `.tmp` leftovers
    of interrupted writes skipped). An unreachable bucket is a StorageError, never an empty list."""
    scheme, bucket, key = _split(prefix_uri)
    if scheme == "file":
        root = Path(key)
        if root.is_file():
            return [_file_info(root)]
        if not root.is_dir():
            return []
        found = [
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ]
        return sorted((_file_info(p) for p in found), key=lambda o: o.uri)
    prefix = key.rstrip("/") + "/" if key and not key.endswith("/") else key
    try:
        objs = list(s3_client().list_objects(bucket, prefix=prefix or None, recursive=True))
    except Exception as exc:
        raise StorageError(f"cannot list s3://{bucket}/{prefix}: {exc}") from exc
    return sorted(
        (
            ObjectInfo(f"s3://{bucket}/{o.object_name}", int(o.size or 0), (o.etag or "").strip('"'))
            for o in objs
            if not o.is_dir
        ),
        key=lambda o: o.uri,
    )


def stat(uri: str) -> ObjectInfo | None:
    """One object's size and version tag; None when it does not exist."""
    scheme, bucket, key = _split(uri)
    if scheme == "file":
        path = Path(key)
        return _file_info(path) if path.is_file() else None
    from minio.error import S3Error

    try:
        st = s3_client().stat_object(bucket, key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
            return None
        raise StorageError(f"cannot stat {uri}: {exc}") from exc
    except Exception as exc:
        raise StorageError(f"cannot stat {uri}: {exc}") from exc
    return ObjectInfo(uri, int(st.size or 0), (st.etag or "").strip('"'))
