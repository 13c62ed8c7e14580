"""Accelerators lmforge knows: memory, dense peak FLOP/s and interconnect, in one table.

MFU (lmforge/train/mfu.py) matches a running device's name against `match`; the planner
(`lmforge plan --gpu-type NAME`) takes memory, peak and bandwidths from the same rows.

Peaks are the vendors' dense (no sparsity) tensor-core figures per device. Memory is what the
driver reports (an "80GB" H100 shows 79.6 GiB, an H200 140 GiB). `link_gbs` is an assumed
achievable collective bandwidth per device inside a node (NVLink, Infinity Fabric, HCCS), about
two thirds of the one-way link peak; between nodes every row assumes one 400 Gb/s NIC per device
(45 GB/s achievable). Ascend 910B figures are from Huawei's public Atlas 800T A2 sheets and are
approximate.
"""

from __future__ import annotations

from dataclasses import dataclass

NETWORK_GBS = 45.0  # one 400 Gb/s InfiniBand / RoCE NIC per device, achievable


@dataclass(frozen=True)
class Accelerator:
    name: str  # what `--gpu-type` accepts (case-insensitive)
    match: str  # fragment of torch.cuda.get_device_name; first match in ACCELERATORS wins
    memory_gib: float | None  # None: several memory sizes share the name
    bf16_tflops: float
    tf32_tflops: float
    link_gbs: float = 300.0
    per_node: int = 8


# More specific names first: "H100 PCIe" must match before "H100", "L40S" before "L40" and "L4".
ACCELERATORS = [
    Accelerator("GH200", "GH200", 94.5, 989.4, 494.7),
    Accelerator("H200", "H200", 140.0, 989.4, 494.7),
    Accelerator("H100-PCIe", "H100 PCIe", 79.6, 756.0, 378.0, link_gbs=40.0),
    Accelerator("H100-NVL", "H100 NVL", 93.1, 835.5, 417.5),
    Accelerator("H100", "H100", 79.6, 989.4, 494.7),  # SXM
    Accelerator("H800", "H800", 79.6, 989.4, 494.7, link_gbs=130.0),
    Accelerator("B200", "B200", 178.4, 2250.0, 1100.0, link_gbs=600.0),
    Accelerator("A100-80", "A100-SXM4-80GB", 79.2, 312.0, 156.0, link_gbs=200.0),
    Accelerator("A100-40", "A100-SXM4-40GB", 39.4, 312.0, 156.0, link_gbs=200.0),
    Accelerator("A100", "A100", None, 312.0, 156.0, link_gbs=200.0),
    Accelerator("A800", "A800", 79.2, 312.0, 156.0, link_gbs=130.0),
    Accelerator("MI300X", "MI300X", 192.0, 1307.4, 653.7, link_gbs=300.0),
    Accelerator("L40S", "L40S", 44.4, 362.0, 183.0, link_gbs=25.0),
    Accelerator("L40", "L40", 44.4, 181.0, 90.5, link_gbs=25.0),
    Accelerator("L4", "L4", 22.0, 121.0, 60.0, link_gbs=25.0),
    Accelerator("A10G", "A10G", 22.0, 70.0, 35.0, link_gbs=25.0),
    Accelerator("RTX-4090", "RTX 4090", 24.0, 165.2, 82.6, link_gbs=25.0),
    Accelerator("RTX-3090", "RTX 3090", 24.0, 71.0, 35.6, link_gbs=25.0),
    Accelerator("V100", "V100", 31.7, 125.0, 15.7, link_gbs=130.0),
    Accelerator("T4", "T4", 15.0, 65.0, 8.1, link_gbs=25.0),
    # Ascend 910B (Atlas 800T A2: 8 devices per node, HCCS full mesh); never a CUDA device name.
    Accelerator("Ascend-910B", "Ascend910B", 64.0, 313.0, 156.0, link_gbs=150.0),
]


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def accelerator_of_device(device_name: str, with_memory: bool = False) -> Accelerator | None:
    """The first row whose fragment is in a CUDA device name ("NVIDIA H100 80GB HBM3"), or None;
    with_memory: only rows that state a memory size."""
    for acc in ACCELERATORS:
        if acc.match in device_name and (acc.memory_gib is not None or not with_memory):
            return acc
    return None


def find_accelerator(name: str) -> Accelerator:
    """The row for a `--gpu-type` name (case, spaces and dashes ignored: "a100-80", "Ascend 910B");
    KeyError naming the choices otherwise."""
    wanted = _key(name).removesuffix("gb")  # "A100-80GB" is "A100-80"
    for acc in ACCELERATORS:
        if _key(acc.name) == wanted and acc.memory_gib is not None:
            return acc
    choices = ", ".join(a.name for a in ACCELERATORS if a.memory_gib is not None)
    raise KeyError(f"unknown GPU type '{name}'; choose one of: {choices}")
