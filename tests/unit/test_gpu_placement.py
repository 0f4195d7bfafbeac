"""GPU pools and memory estimates: where a training request lands, and what cannot fit."""

import pytest
import yaml

from nmm.compile import CompileSettings, compile_pipeline
from nmm.gpu import memory
from nmm.gpu.pools import EXAMPLE_POOLS, LABEL_POOL, PlacementError, choose
from nmm.model import ModelConfig
from nmm.spec import parse_pipeline_document
from tests.conftest import WORKFLOWS


def spec_with(resources: dict, size: dict | None = None, batch: int = 64):
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    doc["spec"]["training"]["resources"] = resources
    doc["spec"]["training"]["phases"][0]["batchSize"] = batch
    if size:
        doc["spec"]["model"]["size"] = size
    return parse_pipeline_document(doc)


def train_pod(spec) -> dict:
    wf = compile_pipeline(spec, CompileSettings())
    (t,) = [t for t in wf["spec"]["templates"] if "resource" in t]
    return yaml.safe_load(t["resource"]["manifest"])["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def test_eight_gpus_with_80_gib_land_on_the_h100_and_h200_pools():
    pod = train_pod(spec_with({"nodes": 2, "gpusPerNode": 8, "gpuMemoryGiB": 80}))
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"] == [{"key": LABEL_POOL, "operator": "In", "values": ["h100", "h200"]}]
    assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_product_narrows_the_pools():
    assert [p.name for p in choose(EXAMPLE_POOLS, 8, None, "H200")] == ["h200"]


def test_a_request_no_pool_holds_is_rejected_naming_the_pools():
    with pytest.raises(PlacementError, match="no GPU pool satisfies 16 GPU"):
        choose(EXAMPLE_POOLS, 16, None, None)


def test_cpu_pipelines_get_no_gpu_placement():
    pod = train_pod(spec_with({"nodes": 1, "processesPerNode": 2}))
    assert "affinity" not in pod and "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]


def test_param_count_matches_the_real_model():
    for qk_norm in (True, False):
        cfg = ModelConfig(vocab_size=133, dim=128, layers=4, heads=4, qk_norm=qk_norm)
        assert memory.count_params(128, 4, 4, 133, cfg.ffn_dim, cfg.qk_norm) == cfg.build().num_params()


def test_a_125m_model_fits_a_24_gib_gpu():
    est = memory.estimate(
        dim=768, layers=12, heads=12, vocab=32_768, seq_len=1024, micro_batch=8, ffn_dim=2048, qk_norm=True
    )
    assert 110e6 < est.params < 140e6
    assert est.fits(24), est.describe()
    pod = train_pod(spec_with({"gpusPerNode": 1, "gpuMemoryGiB": 24}, {"dim": 768, "layers": 12, "heads": 12}, batch=8))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_model_that_cannot_fit_is_rejected_with_the_estimate():
    too_big = spec_with({"gpusPerNode": 1, "gpuMemoryGiB": 24}, {"dim": 8192, "layers": 64, "heads": 64})
    with pytest.raises(PlacementError) as exc:
        compile_pipeline(too_big, CompileSettings())
    msg = str(exc.value)
    assert "does not fit a 24 GiB GPU" in msg and "parameters need" in msg and "optimizer" in msg


def train_job(spec, settings: CompileSettings | None = None) -> dict:
    wf = compile_pipeline(spec, settings or CompileSettings())
    (t,) = [t for t in wf["spec"]["templates"] if "resource" in t]
    return yaml.safe_load(t["resource"]["manifest"])


def queued(queue: str | None = None, priority: str | None = None):
    doc = yaml.safe_load((WORKFLOWS / "quickstart.yaml").read_text())
    doc["spec"]["training"]["resources"] = {"nodes": 2, "gpusPerNode": 8, "gpuMemoryGiB": 80}
    doc["spec"]["training"].update({k: v for k, v in (("queue", queue), ("priorityClass", priority)) if v})
    return parse_pipeline_document(doc)


def test_a_queued_training_job_carries_kueue_s_labels_and_exact_gpu_requests():
    """Kueue holds a PyTorchJob with the queue-name label suspended until its whole gang (master
    and workers) is admitted; it admits on requests, so GPU requests equal limits."""
    from tests.schemas import PYTORCHJOB, crd_errors

    job = train_job(queued("gpu-queue", "nmm-high"))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "nmm-high"
    assert crd_errors(PYTORCHJOB, "v1", job) == []
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        res = replica["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "8"
    default = train_job(queued(), CompileSettings(default_queue="nmm"))  # the chart's LocalQueue
    assert default["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "nmm"
    assert "kueue.x-k8s.io/queue-name" not in train_job(queued())["metadata"]["labels"]  # no Kueue: no label


def test_a_priority_without_a_queue_is_rejected_and_a_bad_queue_name_never_parses():
    with pytest.raises(PlacementError, match="spec.training.priorityClass"):
        train_job(queued(priority="nmm-high"))
    with pytest.raises(Exception, match="queue"):
        queued("Not_A_Queue")


def test_the_local_engine_says_a_queue_has_no_local_effect():
    from nmm.engine.runner import no_local_effect

    wf = compile_pipeline(queued("gpu-queue"), CompileSettings.local("file:///tmp/store"))
    assert "kueue.x-k8s.io/queue-name" in no_local_effect(wf)
