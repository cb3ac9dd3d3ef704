"""What the machine is doing: peak FLOPs for MFU, GPU utilisation and memory (nvidia-ml-py), process memory."""

from __future__ import annotations

import os

import torch

# Dense bf16/fp16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name(); --peak_tflops wins.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "A10": 125.0,
    "V100": 125.0,
    "T4": 65.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float:
    """FLOP/s one device can do at best: the override, the table's entry for this GPU, or 0 (unknown: no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():  # longer names first where one contains another (A10G before A10)
        if key in name:
            return tflops * 1e12
    return 0.0


class SystemMonitor:
    """Process memory always; GPU utilisation and memory through nvidia-ml-py when a GPU is there (skipped if not)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.nvml = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self.nvml = pynvml
            except Exception:  # no nvidia-ml-py or no driver access: the other figures still come
                self.nvml = None

    def read(self) -> dict[str, float]:
        metrics = {"system/rss_gb": _rss_bytes() / 1e9}
        if self.device.type == "cuda":
            metrics["system/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        if self.nvml is not None:
            metrics["system/gpu_utilization"] = float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            metrics["system/gpu_memory_used_gb"] = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 1e9
        return metrics


def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss
    except ImportError:  # Linux without psutil
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
