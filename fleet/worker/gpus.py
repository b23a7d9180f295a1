"""Which GPU each worker process gets: one process per GPU, one per MIG slice.

CUDA numbers GPUs fastest-first unless told otherwise, NVML (and so the sampler and
`nvidia-smi`) by PCI bus: the two orders differ on mixed nodes. So the worker binds
each child by UUID (`CUDA_VISIBLE_DEVICES=GPU-<uuid>`, or `MIG-<uuid>` for a MIG slice:
a CUDA process can use one MIG slice only, so a GPU in MIG mode gets one process per
slice) and sets `CUDA_DEVICE_ORDER=PCI_BUS_ID` for whatever still counts by index.

`visible_units()` lists them in NVML's order, keeping to the node's own
CUDA_VISIBLE_DEVICES when it is set (indices, GPU- or MIG- UUIDs). Without NVML it
falls back to torch's device count (indices, in PCI order). Never raises; [] on a node
without GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GpuUnit:
    index: int  # NVML (PCI) index of the physical GPU
    uuid: str  # GPU-... (or the physical GPU's, for a MIG slice)
    slices: list[str] = field(default_factory=list)  # MIG-... UUIDs when MIG is on

    @property
    def units(self) -> list[str]:
        return self.slices or [self.uuid]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_gpus(nvml: Any) -> list[GpuUnit]:
    """The GPUs (and their MIG slices) NVML sees, in PCI order. `nvml`: the pynvml module."""
    gpus: list[GpuUnit] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        gpu = GpuUnit(index, _text(nvml.nvmlDeviceGetUUID(handle)))
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except Exception:  # noqa: BLE001 - NVMLError_NotSupported: a GPU without MIG
            current = 0
        if current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
            for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                except Exception:  # noqa: BLE001, S112 - NVMLError_NotFound: an empty slot
                    continue
                gpu.slices.append(_text(nvml.nvmlDeviceGetUUID(mig)))
        gpus.append(gpu)
    return gpus


def select(gpus: list[GpuUnit], visible: str | None) -> list[str]:
    """The units (UUIDs) of `gpus` that CUDA_VISIBLE_DEVICES=`visible` allows, in its order."""
    if visible is None:
        return [unit for gpu in gpus for unit in gpu.units]
    chosen: list[str] = []
    for entry in (v.strip() for v in visible.split(",")):
        if not entry:
            continue
        if entry.isdigit():
            matches = [gpu.units for gpu in gpus if gpu.index == int(entry)]
        elif entry.startswith("MIG-"):
            matches = [[entry]] if any(entry in gpu.slices for gpu in gpus) else []
        else:
            matches = [gpu.units for gpu in gpus if gpu.uuid == entry or gpu.uuid.startswith(entry)]
        if not matches:
            break  # CUDA stops at the first invalid entry too
        chosen.extend(unit for unit in matches[0] if unit not in chosen)
    return chosen


def visible_units() -> list[str]:
    """CUDA_VISIBLE_DEVICES values, one per worker process (see the module docstring)."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no nvidia-ml-py, no driver: ask torch
        return _torch_indices(visible)
    try:
        return select(nvml_gpus(pynvml), visible)
    except Exception:  # noqa: BLE001 - an NVML failure while listing
        return _torch_indices(visible)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 - nothing to tell anyone
            pass


def _torch_indices(visible: str | None) -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    count = torch.cuda.device_count()
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip()][:count]
    return [str(i) for i in range(count)]
