"""Read maskdepth shards into normalised training batches, with DALI or pure PyTorch.

    from pipeline import LoaderConfig, build_loader, denormalize
    loader = build_loader("data/shards", "train", LoaderConfig(device="cuda"))
    for batch in loader.epoch(epoch): ...

``import pipeline`` never imports nvidia.dali; only ``pipeline.dali`` does, on first use.
"""

from pipeline.augment import denormalize
from pipeline.config import LoaderConfig, LoaderError
from pipeline.loader import Loader, build_loader

__all__ = ["Loader", "LoaderConfig", "LoaderError", "build_loader", "denormalize"]
