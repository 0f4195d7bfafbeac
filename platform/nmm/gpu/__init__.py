"""GPUs: NVML inventory and telemetry, node-pool placement, memory estimates."""
