import pytest

from nmm.engine.params import UnresolvedParameter, expand_env_refs, substitute
from nmm.engine.runner import topo_order
from nmm.engine.sandbox import Sandbox
from nmm.engine.when import WhenError, evaluate


def test_substitute_replaces_known_and_rejects_unknown_parameters():
    scope = {"inputs.parameters.x": "1", "tasks.a.outputs.parameters.uri": "s3://b/k"}
    assert substitute("--x={{inputs.parameters.x}} {{ tasks.a.outputs.parameters.uri }}", scope) == "--x=1 s3://b/k"
    with pytest.raises(UnresolvedParameter):
        substitute("{{inputs.parameters.nope}}", scope)


def test_kubernetes_env_references_expand_like_the_kubelet():
    env = {"RANK": "2"}
    assert expand_env_refs("--node-rank=$(RANK)", env) == "--node-rank=2"
    assert expand_env_refs("$(UNSET) $$(RANK)", env) == "$(UNSET) $(RANK)"


@pytest.mark.parametrize(
    "expr,want",
    [
        ("pass == pass", True),
        ("fail == pass", False),
        ("a != b", True),
        ("0.95 >= 0.9", True),
        ("1 < 0.5 || x == x", True),
        ("x == x && 1 > 2", False),
        ("!a == a", False),
        ("'pass' == pass", True),
    ],
)
def test_when_expressions(expr, want):
    assert evaluate(expr) is want


def test_when_rejects_what_it_cannot_read():
    with pytest.raises(WhenError):
        evaluate("pass")
    with pytest.raises(WhenError):
        evaluate("a > 1")


def test_topological_order_and_cycles():
    tasks = [{"name": "c", "dependencies": ["b"]}, {"name": "a"}, {"name": "b", "dependencies": ["a"]}]
    assert [t["name"] for t in topo_order(tasks)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="cycle"):
        topo_order([{"name": "a", "dependencies": ["b"]}, {"name": "b", "dependencies": ["a"]}])
    with pytest.raises(ValueError, match="unknown task"):
        topo_order([{"name": "a", "dependencies": ["z"]}])


def test_sandbox_maps_only_emptydir_mounts(tmp_path):
    c = {"volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cfg", "mountPath": "/etc/cfg"}]}
    sb = Sandbox.for_container(
        c, [{"name": "tmp", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "x"}}], tmp_path
    )
    assert sb.map_path("/tmp/nmm/outputs/x") == str(tmp_path / "tmp" / "nmm/outputs/x")
    assert sb.map_path("/tmpfoo") == "/tmpfoo"
    assert sb.map_path("/etc/cfg/a") == "/etc/cfg/a"


def test_the_command_is_never_mapped_even_when_it_lives_under_a_mount_path(tmp_path):
    sb = Sandbox(mounts={"/tmp": tmp_path})
    argv = sb.map_argv(["/tmp/venv/bin/python", "/tmp/out/x", "--flag", "file:///tmp/store"])
    assert argv == ["/tmp/venv/bin/python", str(tmp_path / "out/x"), "--flag", "file:///tmp/store"]


def test_each_variant_s_evaluate_follows_its_train_before_the_next_variant_trains():
    tasks = [{"name": "curate"}]
    for v in ("a", "b"):
        tasks += [
            {"name": f"train-{v}", "dependencies": ["curate"]},
            {"name": f"evaluate-{v}", "dependencies": [f"train-{v}"]},
        ]
    tasks.append({"name": "rollout", "dependencies": ["evaluate-a", "evaluate-b"]})
    assert [t["name"] for t in topo_order(tasks)] == [
        "curate",
        "train-a",
        "evaluate-a",
        "train-b",
        "evaluate-b",
        "rollout",
    ]
