"""Pieces of the training run that train.py and predict.py share.

``checkpoint`` saves and loads run state safely, ``monitor`` does the CUDA memory and NVML
bookkeeping, ``figures`` draws image grids with PIL. Each imports only torch, numpy and PIL.
"""

from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]
