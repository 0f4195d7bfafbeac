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
    assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in pod["tolerations"]
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
    est = memory.estimate(dim=768, layers=12, heads=12, vocab=32_768, seq_len=1024, micro_batch=8, ffn_dim=2048, qk_norm=True)
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
