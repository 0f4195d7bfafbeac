"""Faults of the object store, through the minio client exactly as nmm talks to MinIO: moto's S3
server behind a fault-injecting proxy (tests/faults/s3_proxy.py). Each test names the fault,
what must hold, and checks it."""

from __future__ import annotations

import threading
import time

import pytest

from nmm import storage
from nmm.storage import objects
from tests.faults.s3_proxy import FaultyS3

pytestmark = pytest.mark.integration


@pytest.fixture
def faulty(s3_server, monkeypatch):
    from minio import Minio

    Minio(
        s3_server["endpoint"],
        access_key=s3_server["access_key"],
        secret_key=s3_server["secret_key"],
        secure=False,
        region="us-east-1",
    ).bucket_exists("faults") or Minio(
        s3_server["endpoint"],
        access_key=s3_server["access_key"],
        secret_key=s3_server["secret_key"],
        secure=False,
        region="us-east-1",
    ).make_bucket("faults")
    proxy = FaultyS3(s3_server["endpoint"])
    monkeypatch.setenv("NMM_S3_ENDPOINT", f"http://{proxy.endpoint}")
    monkeypatch.setenv("NMM_S3_ACCESS_KEY", s3_server["access_key"])
    monkeypatch.setenv("NMM_S3_SECRET_KEY", s3_server["secret_key"])
    monkeypatch.setattr(objects, "S3_TIMEOUT_S", 1.0)  # a hang shows within a second a try
    monkeypatch.setattr(objects, "S3_RETRIES", 3)
    monkeypatch.setattr(objects, "S3_BACKOFF_S", 0.5)  # backoff 0.5, 1, 2 s
    objects._minio.cache_clear()
    yield proxy
    objects._minio.cache_clear()
    proxy.close()


def test_503s_for_a_while_are_retried_with_backoff_then_succeed(faulty):
    """Fault: the store answers 503 to the next 3 requests. Must hold: the write and the read
    succeed (retried with backoff), and the bytes are the ones written."""
    faulty.fail_next(3, 503)
    t0 = time.monotonic()
    storage.write_bytes("s3://faults/a/x.bin", b"payload")
    assert time.monotonic() - t0 >= 0.5 + 1.0  # it backed off between tries
    faulty.fail_next(2, 500)
    assert storage.read_bytes("s3://faults/a/x.bin") == b"payload"


def test_a_store_failing_for_good_fails_clearly_in_bounded_time(faulty):
    """Fault: every request answered 500. Must hold: a StorageError naming the object, after the
    bounded retries (not a hang, not a guess that the object is absent)."""
    faulty.fail_always(500)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match="faults/a/y.bin"):
        storage.read_bytes("s3://faults/a/y.bin")
    with pytest.raises(storage.StorageError):
        storage.exists("s3://faults/a/y.bin")  # "cannot tell" is an error, never False
    assert time.monotonic() - t0 < 60


def test_a_hanging_store_times_out_and_the_retry_gets_through(faulty):
    """Fault: the store holds requests for 2.5 s (the client waits 1 s a try). Must hold: the
    stuck tries time out and are retried; once it answers, the write lands, whole."""
    faulty.hang_for(2.5)
    storage.write_bytes("s3://faults/a/z.bin", b"late but whole")
    faulty.hang_for(0)
    assert storage.read_bytes("s3://faults/a/z.bin") == b"late but whole"


def test_two_writers_racing_on_one_folder_exactly_one_wins(s3_server, faulty):
    """Fault: two writers publish the same folder at once with different contents (R21). Must
    hold: exactly one manifest commits; the other writer gets PublishConflict; the folder's
    files match the winner's manifest. Same contents: both succeed, one commit."""
    results: dict[str, object] = {}

    def writer(name: str, payload: bytes) -> None:
        try:
            results[name] = storage.publish("s3://faults/race", {"data.bin": payload}, {"by": name}, exclusive=True)
        except storage.StorageError as exc:
            results[name] = exc

    threads = [threading.Thread(target=writer, args=(n, n.encode() * 1000)) for n in ("alpha", "bravo")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, r in results.items() if isinstance(r, dict)]
    losers = [r for r in results.values() if isinstance(r, storage.PublishConflict)]
    assert len(winners) == 1 and len(losers) == 1, results
    manifest = storage.read_manifest("s3://faults/race", verify=True)
    assert manifest["by"] == winners[0]
    assert storage.read_file("s3://faults/race", manifest, "data.bin") == winners[0].encode() * 1000
    same = [storage.publish("s3://faults/twin", {"d": b"same"}, {"k": 1}, exclusive=True) for _ in range(2)]
    assert same[0]["digest"] == same[1]["digest"]
