import pytest

from nmm import storage
from nmm.spec import parse_gate
from nmm.stages.rollout import decide


def test_publish_writes_manifest_last_with_digests(tmp_path, monkeypatch):
    order = []
    real = storage.publish.__globals__["write_bytes"]

    def spy(uri, data, **kw):
        order.append(uri.rsplit("/", 1)[-1])
        real(uri, data, **kw)

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


ACC = "m2t.digits.accuracy"


def test_rollout_promotes_only_when_gates_pass_and_not_worse_than_champion():
    gates = [parse_gate(f"{ACC} >= 0.5")]
    assert decide(True, {ACC: 0.9}, None, gates) == (True, "no champion yet")
    assert decide(False, {ACC: 0.99}, None, gates)[0] is False
    ok, reason = decide(True, {ACC: 0.91}, {ACC: 0.93}, gates)
    assert not ok and "worse than champion" in reason
    assert decide(True, {ACC: 0.93}, {ACC: 0.93}, gates)[0] is True


def test_no_gates_promotes_nothing_even_far_below_the_champion():
    # main promoted 0.05 over a 0.97 champion: with no gates, decide compared nothing.
    ok, reason = decide(True, {ACC: 0.05}, {ACC: 0.97}, [])
    assert not ok and "no gates" in reason
    assert decide(True, {ACC: 0.99}, None, [])[0] is False


def test_a_gated_metric_the_champion_lacks_promotes_nothing():
    gates = [parse_gate(f"{ACC} >= 0.5")]
    ok, reason = decide(True, {ACC: 0.05}, {"m2g.digits.accuracy": 0.97}, gates)
    assert not ok and "champion has no" in reason
    ok, reason = decide(True, {}, None, gates)
    assert not ok and "candidate lacks" in reason
    nan = float("nan")  # every comparison with NaN is False: it must not read as "not worse"
    assert decide(True, {ACC: 0.05}, {ACC: nan}, gates)[0] is False
    assert decide(True, {ACC: nan}, {ACC: 0.9}, gates)[0] is False


def test_worse_follows_the_gate_direction():
    loss = "m2g.shapes_geneval.overall"
    lower = [parse_gate(f"{loss} <= 0.5")]  # a metric where less is better
    assert decide(True, {loss: 0.2}, {loss: 0.3}, lower)[0] is True
    ok, reason = decide(True, {loss: 0.4}, {loss: 0.3}, lower)
    assert not ok and "worse than champion" in reason
    exact = [parse_gate(f"{loss} == 0.5")]
    assert decide(True, {loss: 0.52}, {loss: 0.6}, exact)[0] is True
    assert decide(True, {loss: 0.7}, {loss: 0.55}, exact)[0] is False


@pytest.mark.parametrize("bad", ["../escape.txt", "a/../../b", "x#frag", "x;rm", "/abs/path", "file:///etc/passwd"])
def test_lineage_refuses_artifact_paths_that_escape_the_run_s8(bad):
    from nmm.lineage.runs import _safe_artifact_path

    with pytest.raises(ValueError, match="refusing artifact path"):
        _safe_artifact_path(bad)
    assert _safe_artifact_path("eval") == "eval"


def test_an_exclusive_publish_on_a_file_store_commits_once_and_keeps_the_winner(tmp_path):
    """R21 on a file:// store (hard links): the second writer of other contents gets
    PublishConflict and the winner's files are untouched; an identical second publish (a
    retried attempt) is accepted; a create-only write of a taken key is AlreadyExists."""
    folder = (tmp_path / "out").as_uri()
    first = storage.publish(folder, {"d.bin": b"first"}, {"by": "a"}, exclusive=True)
    with pytest.raises(storage.PublishConflict):
        storage.publish(folder, {"d.bin": b"other"}, {"by": "b"}, exclusive=True)
    assert storage.read_file(folder, storage.read_manifest(folder, verify=True), "d.bin") == b"first"
    assert storage.publish(folder, {"d.bin": b"first"}, {"by": "a"}, exclusive=True)["digest"] == first["digest"]
    with pytest.raises(storage.AlreadyExists):
        storage.write_bytes(storage.join(folder, "d.bin"), b"x", create_only=True)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]  # no leftovers
