import pytest

from nmm import storage
from nmm.stages.rollout import decide


def test_publish_writes_manifest_last_with_digests(tmp_path, monkeypatch):
    order = []
    real = storage.publish.__globals__["write_bytes"]

    def spy(uri, data):
        order.append(uri.rsplit("/", 1)[-1])
        real(uri, data)

    monkeypatch.setitem(storage.publish.__globals__, "write_bytes", spy)
    folder = (tmp_path / "out").as_uri()
    m = storage.publish(folder, {"b.bin": b"bb", "a.bin": b"a"}, {"kind": "test"})
    assert order == ["a.bin", "b.bin", "manifest.json"]
    assert m["files"]["a.bin"]["sha256"] == storage.sha256_hex(b"a")
    assert storage.read_manifest(folder, verify=True)["digest"] == m["digest"]


def test_same_content_gets_the_same_digest(tmp_path):
    a = storage.publish((tmp_path / "x").as_uri(), {"f": b"1"}, {"k": 1})
    b = storage.publish((tmp_path / "y").as_uri(), {"f": b"1"}, {"k": 1})
    assert a["digest"] == b["digest"]


def test_a_folder_whose_files_are_gone_does_not_exist(tmp_path):
    folder = (tmp_path / "out").as_uri()
    storage.publish(folder, {"f": b"1"}, {})
    (tmp_path / "out" / "f").unlink()
    assert storage.read_manifest(folder, verify=True) is None


def test_tampered_file_is_refused(tmp_path):
    folder = (tmp_path / "out").as_uri()
    m = storage.publish(folder, {"f": b"1"}, {})
    (tmp_path / "out" / "f").write_bytes(b"2")
    with pytest.raises(storage.StorageError, match="does not match"):
        storage.read_file(folder, m, "f")


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(storage.StorageError, match="unsupported storage URI"):
        storage.read_bytes("gs://bucket/x")


def test_rollout_promotes_only_when_gates_pass_and_not_worse_than_champion():
    gated = ["m2t.digits.accuracy"]
    assert decide(True, {"m2t.digits.accuracy": 0.9}, None, gated) == (True, "no champion yet")
    assert decide(False, {"m2t.digits.accuracy": 0.99}, None, gated)[0] is False
    ok, reason = decide(True, {"m2t.digits.accuracy": 0.91}, {"m2t.digits.accuracy": 0.93}, gated)
    assert not ok and "worse than champion" in reason
    assert decide(True, {"m2t.digits.accuracy": 0.93}, {"m2t.digits.accuracy": 0.93}, gated)[0] is True


@pytest.mark.parametrize("bad", ["../escape.txt", "a/../../b", "x#frag", "x;rm", "/abs/path", "file:///etc/passwd"])
def test_lineage_refuses_artifact_paths_that_escape_the_run_s8(bad):
    from nmm.lineage.runs import _safe_artifact_path

    with pytest.raises(ValueError, match="refusing artifact path"):
        _safe_artifact_path(bad)
    assert _safe_artifact_path("eval") == "eval"
