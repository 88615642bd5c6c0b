"""What ``train.py`` is built from, one module per concept; packages never import train.py.

- ``distributed``: :class:`Runtime` (device, rank, autocast, memory format), the one device
  resolution :func:`resolve_device` (train.py, predict.py, the benchmarks), torchrun setup,
  per-rank seeds.
- ``builders``: what a run is built from: its loaders, model, loss and :class:`TrainState`
  (restored from a checkpoint), with ``--compile``.
- ``step``: the training step, written once: batch to device, forward under autocast, loss
  (:func:`forward_loss`), backward and update (:func:`train_step`), and its timing
  (:class:`StepTimer`). ``benchmarks.train_throughput`` runs the same step.
- ``evaluate``: the test pass (loss parts, metrics, preview samples), all ranks together in
  one collective at its end.
- ``recipe``: the recipe options, the optimizer (fused on CUDA, foreach elsewhere) and the
  per-step learning-rate schedule; the recipes' values are :mod:`model.recipes`.
- ``checkpoint``: :class:`TrainState` (``state_dict`` / ``load_state_dict``), atomic checkpoint
  writes, ``weights_only`` reads, RNG state.
- ``rundir``: the run directory (RUN_FILES, --resume/--overwrite rules, config.json,
  metrics.json, results.png, timings.csv), the per-epoch clock and the one training
  samples/s.
- ``logger``: step and epoch log lines, TensorBoard scalars, loss sums on the device.
- ``monitor``: :func:`gpu_monitor`, which runs the three below around the training steps;
  ``gpu_memory``: per-layer CUDA memory hooks (memory_layers.csv); ``nvml``: the NVML sampler
  (gpu_report.json); ``profiling``: torch.profiler traces and cProfile output.
- ``figures``: prediction grids for TensorBoard, results.png and predict.py.
- ``errors``: :class:`TrainError`, which ``train.py`` prints as one line; ``options``: argparse
  types.
"""

from training.checkpoint import CheckpointError, TrainState, load_checkpoint, save_checkpoint
from training.distributed import DeviceError, Runtime, resolve_device
from training.errors import TrainError

__all__ = [
    "CheckpointError",
    "DeviceError",
    "Runtime",
    "TrainError",
    "TrainState",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
]
