"""Per-layer CUDA memory: forward hooks that read allocated and reserved memory around every
module's forward, written to memory_layers.csv.

The readers are plain functions, so the recorder runs on CPU in tests with deterministic fake
readings; :func:`cuda_memory_readers` gives the real ones.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharding.atomic import atomic_write

# The columns of memory_layers.csv, one row per hook call.
MEMORY_COLUMNS = (
    "layer_idx",
    "call_idx",
    "layer_type",
    "exp",
    "hook_type",
    "mem_all",
    "mem_cached",
)


class GpuUnavailable(Exception):
    """No CUDA device or no NVML: the GPU reports are skipped, the run goes on.

    Raised here for memory and by :func:`training.nvml.nvml_reader` for NVML.
    """


class LayerMemoryRecorder:
    """Record allocated and reserved memory before and after every module's forward.

    One row per hook call with :data:`MEMORY_COLUMNS`; ``call_idx`` counts hook calls in
    order, ``layer_idx`` is the module's index in ``model.modules()``.
    """

    def __init__(
        self,
        model: nn.Module,
        read_allocated: Callable[[], int],
        read_reserved: Callable[[], int],
        exp: str = "train",
    ) -> None:
        self.rows: list[dict[str, Any]] = []
        self._read_allocated = read_allocated
        self._read_reserved = read_reserved
        self._handles = []
        for layer_idx, module in enumerate(model.modules()):
            self._handles.append(
                module.register_forward_pre_hook(self._hook(layer_idx, module, exp, "pre"))
            )
            self._handles.append(
                module.register_forward_hook(self._hook(layer_idx, module, exp, "fwd"))
            )

    def _hook(self, layer_idx: int, module: nn.Module, exp: str, hook_type: str) -> Callable:
        layer_type = type(module).__name__

        def record(*_: Any) -> None:
            self.rows.append(
                {
                    "layer_idx": layer_idx,
                    "call_idx": len(self.rows),
                    "layer_type": layer_type,
                    "exp": exp,
                    "hook_type": hook_type,
                    "mem_all": self._read_allocated(),
                    "mem_cached": self._read_reserved(),
                }
            )

        return record

    def remove(self) -> None:
        """Detach every hook; the rows stay."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def write_csv(self, path: str | Path) -> None:
        """Write the rows to ``path`` with a header line."""
        with atomic_write(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MEMORY_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)


def cuda_memory_readers(device: torch.device) -> tuple[Callable[[], int], Callable[[], int]]:
    """``(read_allocated, read_reserved)`` for a CUDA ``device``."""
    if device.type != "cuda":
        raise GpuUnavailable(f"device {device} is not a CUDA device")
    return (
        lambda: torch.cuda.memory_allocated(device),
        lambda: torch.cuda.memory_reserved(device),
    )
