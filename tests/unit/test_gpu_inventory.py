"""GPU inventory → node labels: from GPU Feature Discovery, from NVML, and without either."""

import subprocess

import pynvml
import pytest

from nmm.gpu import inventory
from nmm.gpu.pools import EXAMPLE_POOLS
from tests.conftest import NMM


def test_gfd_labels_become_nmm_labels_with_the_matching_pool():
    node = {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.count": "8",
        "nvidia.com/cuda.driver-version.full": "570.86.15",
    }
    inv = inventory.from_gfd(node)
    assert inv.source == "gfd" and len(inv.gpus) == 8
    assert inventory.labels(inv, EXAMPLE_POOLS) == {
        "nmm.dev/gpu.count": "8",
        "nmm.dev/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nmm.dev/gpu.memory-gib": "79",
        "nmm.dev/gpu.driver": "570.86.15",
        "nmm.dev/gpu.healthy": "true",
        "nmm.dev/gpu.source": "gfd",
        "nmm.dev/gpu.pool": "h100",
    }


def test_a_node_without_gfd_labels_has_no_gfd_inventory():
    assert inventory.from_gfd({"kubernetes.io/hostname": "n1"}) is None


def test_nvml_devices_are_read_and_labelled(monkeypatch):
    class Mem:
        total = 141 * 1024**3
        used = 10 * 1024**3

    class Util:
        gpu = 55

    calls = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "NVIDIA H200")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: Mem)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: Util)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "580.1")
    inv = inventory.read_gpus()
    assert [g.product for g in inv.gpus] == ["NVIDIA-H200", "NVIDIA-H200"] and inv.gpus[0].memory_mib == 141 * 1024
    labels = inventory.labels(inv, EXAMPLE_POOLS)
    assert labels["nmm.dev/gpu.pool"] == "h200" and labels["nmm.dev/gpu.memory-gib"] == "141"
    assert inventory.telemetry() == {
        "gpu/0/utilization": 55.0,
        "gpu/0/memory_used_gib": 10.0,
        "gpu/1/utilization": 55.0,
        "gpu/1/memory_used_gib": 10.0,
    }
    assert calls.count("init") == calls.count("shutdown") == 2


def test_without_nvml_there_is_no_inventory_and_no_telemetry(monkeypatch):
    def missing():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    assert inventory.read_gpus() is None
    assert inventory.telemetry() == {}


@pytest.mark.skipif(inventory.read_gpus() is not None, reason="this machine has an NVIDIA GPU")
def test_cli_on_a_machine_without_nvml_says_so_and_exits_cleanly():
    r = subprocess.run([NMM, "gpu", "inventory"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "no NVIDIA GPU / driver found" in r.stdout and "Traceback" not in r.stderr
