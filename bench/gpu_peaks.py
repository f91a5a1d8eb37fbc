"""Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs `bench gpu` may run on, keyed by the exact name
torch.cuda.get_device_name returns (nvidia-smi's): a part of a name would give an SXM H100 ("NVIDIA H100 80GB
HBM3") the PCIe card's peak, and "% of peak" 1.31x too high. A name not here gets no "% of peak", never a guess.

Each figure is NVIDIA's data sheet's BF16 Tensor Core figure without sparsity: where the sheet gives only the
"with sparsity" figure (H100, H200, L4), half of it, as its footnote says."""

from __future__ import annotations

H100 = "NVIDIA H100 Tensor Core GPU data sheet (nvidia.com/en-us/data-center/h100), BF16 Tensor Core, with sparsity / 2"
H200 = "NVIDIA H200 Tensor Core GPU data sheet (nvidia.com/en-us/data-center/h200), BF16 Tensor Core, with sparsity / 2"
A100 = "NVIDIA A100 Tensor Core GPU data sheet (nvidia.com/en-us/data-center/a100), BF16 Tensor Core, dense"

# name -> (TFLOP/s, where the figure comes from)
BF16_PEAK: dict[str, tuple[float, str]] = {
    "NVIDIA H100 80GB HBM3": (1979 / 2, H100 + " (H100 SXM5)"),
    "NVIDIA H100 PCIe": (1513 / 2, H100 + " (H100 PCIe)"),
    "NVIDIA H100 NVL": (1671 / 2, H100 + " (H100 NVL)"),
    "NVIDIA H200": (1979 / 2, H200 + " (H200 SXM)"),
    "NVIDIA H200 NVL": (1671 / 2, H200 + " (H200 NVL)"),
    "NVIDIA A100-SXM4-40GB": (312.0, A100),
    "NVIDIA A100-SXM4-80GB": (312.0, A100),
    "NVIDIA A100-PCIE-40GB": (312.0, A100),
    "NVIDIA A100 80GB PCIe": (312.0, A100),
    "NVIDIA L40S": (362.05, "NVIDIA L40S data sheet, BF16 Tensor Core, dense"),
    "NVIDIA L40": (181.05, "NVIDIA L40 data sheet, BF16 Tensor Core, dense"),
    "NVIDIA L4": (242 / 2, "NVIDIA L4 data sheet, BF16 Tensor Core, with sparsity / 2"),
    "NVIDIA A10": (125.0, "NVIDIA A10 data sheet, BF16 Tensor Core, dense"),
}


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the GPU named exactly `name`; None for any other name."""
    return BF16_PEAK[name][0] if name in BF16_PEAK else None


def peak_source(name: str) -> str:
    """Where `name`'s peak comes from, or why there is none (for the results file)."""
    if name in BF16_PEAK:
        return BF16_PEAK[name][1]
    return f"{name!r} is not in bench/gpu_peaks.py's table: no % of peak (add its data sheet's dense bf16 figure)"
