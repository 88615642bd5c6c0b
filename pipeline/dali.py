"""The DALI backend: the only module that imports nvidia.dali (callers import it lazily).

DALI reads the shards and decodes the JPEGs (nvJPEG/HW decoder on the GPU, libjpeg-turbo on
CPU threads) and hands over uint8 HWC batches; jitter, noise and normalisation then run as one
torch pass per image (pipeline.augment), on the same device, where they were measured cheapest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline.config import LoaderConfig, LoaderError
from pipeline.source import PARTS, Shard, find_undecodable

log = logging.getLogger(__name__)

OUTPUTS = (*PARTS, "key")


def decode_and_resize(encoded, output_type, size, stored_size, gpu: bool):
    """Decode one JPEG stream to uint8 (C, H, W), resizing only when the stored size differs."""
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=output_type)
    if tuple(stored_size) != (size, size):
        images = fn.resize(images, size=[size, size], antialias=True)
    if output_type == types.RGB:
        # Planar here, in DALI's threads: torch's strided HWC -> CHW copy was the slowest step.
        images = fn.transpose(images, perm=[2, 0, 1])
    return images


@pipeline_def(enable_conditionals=False)
def shard_pipeline(
    paths, index_paths, channels, sizes, image_size, depth_size, gpu, shard, shuffle, fill, key_len
):
    """Read the four JPEGs of each sample plus its key (as padded bytes of its source info)."""
    shard_id, num_shards = shard
    bg, fg_bg, mask, depth = fn.readers.webdataset(
        name="Reader",  # the iterator needs the name to know where the epoch ends
        paths=paths,
        index_paths=index_paths,
        ext=[f"{part}.jpg" for part in PARTS],
        missing_component_behavior="error",
        random_shuffle=shuffle,
        initial_fill=fill,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,  # with reader_name the iterator trims the padding
    )
    # "path:offset:key.bg.jpg"; padded to a fixed length so the iterator can batch it.
    key = fn.pad(fn.get_property(bg, key="source_info"), axes=[0], shape=[key_len])
    colour = types.RGB if channels == 3 else types.GRAY
    return (
        decode_and_resize(bg, colour, image_size, sizes["bg"], gpu),
        decode_and_resize(fg_bg, colour, image_size, sizes["fg_bg"], gpu),
        decode_and_resize(mask, types.GRAY, image_size, sizes["mask"], gpu),
        decode_and_resize(depth, types.GRAY, depth_size, sizes["depth"], gpu),
        key,
    )


def _keys(padded: torch.Tensor) -> list[str]:
    rows = padded.numpy().tobytes()
    width = padded.shape[1]
    keys = []
    for start in range(0, len(rows), width):
        info = rows[start : start + width].rstrip(b"\0").decode()
        keys.append(info.rsplit(":", 1)[-1].split(".", 1)[0])
    return keys


def iterate_epoch(
    shards: list[Shard],
    channels: int,
    sizes: dict,
    cfg: LoaderConfig,
    seed: int,
    shard: tuple[int, int],
    shuffle: bool,
    rank_samples: int,
) -> Iterator[tuple[dict[str, torch.Tensor], list[str]]]:
    """Yield (uint8 (B, C, H, W) tensors by part, keys) for one epoch of this rank."""
    gpu = cfg.device.startswith("cuda")
    device_id = None
    if gpu:
        device_id = torch.device(cfg.device).index
        device_id = torch.cuda.current_device() if device_id is None else device_id
    paths = [s.path for s in shards]
    index_paths = [s.index for s in shards] if all(s.index for s in shards) else None
    pipe = shard_pipeline(
        paths=paths,
        index_paths=index_paths,
        channels=channels,
        sizes=sizes,
        image_size=cfg.image_size,
        depth_size=cfg.depth_size,
        gpu=gpu,
        shard=shard,
        shuffle=shuffle,
        fill=max(1, min(cfg.shuffle_buffer, rank_samples)),
        key_len=max(len(p) for p in paths) + 512,
        batch_size=cfg.batch_size,
        num_threads=max(1, cfg.num_threads),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=2,
    )
    policy = LastBatchPolicy.PARTIAL if cfg.last_batch == "partial" else LastBatchPolicy.DROP
    where = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more shards)"
    try:
        pipe.build()
        iterator = DALIGenericIterator(
            pipe, list(OUTPUTS), reader_name="Reader", last_batch_policy=policy, auto_reset=False
        )
    except RuntimeError as exc:
        raise LoaderError(f"{where}: DALI cannot read the shards: {_reason(exc)}") from exc
    try:
        for outputs in iterator:
            batch = outputs[0]
            keys = _keys(batch.pop("key"))
            for part in ("bg", "fg_bg", "mask", "depth"):
                if batch[part].shape[-1] == 1:  # single-channel HWC is already CHW in memory
                    batch[part] = batch[part].view(batch[part].shape[:-1]).unsqueeze(1)
            yield batch, keys
    except RuntimeError as exc:
        reason = _reason(exc)
        if "decoders.image" in str(exc):
            # DALI does not say which sample failed; find it so the message names the file.
            culprit = find_undecodable(shards)
            if culprit:
                raise LoaderError(f"{culprit}; DALI said: {reason}") from exc
        raise LoaderError(f"{where}: DALI failed mid-epoch: {reason}") from exc
    finally:
        del iterator, pipe


_NOISE = ("Critical error in pipeline", "Current pipeline object is no longer valid")


def _reason(exc: BaseException) -> str:
    """The one informative line of a DALI error (it wraps the reason in an operator stack)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_NOISE)]
    return lines[-1] if lines else type(exc).__name__


@pipeline_def
def decode_only_pipeline(paths, index_paths, channels):
    """The four JPEG decodes per sample and nothing else: the CPU decode ceiling."""
    bg, fg_bg, mask, depth = fn.readers.webdataset(
        name="Reader", paths=paths, index_paths=index_paths, ext=[f"{p}.jpg" for p in PARTS]
    )
    colour = types.RGB if channels == 3 else types.GRAY
    return (
        fn.decoders.image(bg, output_type=colour),
        fn.decoders.image(fg_bg, output_type=colour),
        fn.decoders.image(mask, output_type=types.GRAY),
        fn.decoders.image(depth, output_type=types.GRAY),
    )


def decode_only_batches(shards: list[Shard], channels: int, batch_size: int, num_threads: int):
    """Endless decoded batches (DALI outputs, never copied out) for the benchmark's ceiling."""
    paths = [s.path for s in shards]
    index_paths = [s.index for s in shards] if all(s.index for s in shards) else None
    pipe = decode_only_pipeline(
        paths=paths,
        index_paths=index_paths,
        channels=channels,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=None,
        seed=0,
        prefetch_queue_depth=2,
    )
    pipe.build()
    while True:
        outputs = pipe.run()
        yield len(outputs[0])
