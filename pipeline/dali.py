"""The DALI backend: the only module that imports nvidia.dali (callers import it lazily).

DALI reads the shards and decodes the JPEGs (nvJPEG and the hardware decoder on the GPU,
libjpeg-turbo on CPU threads) and hands over uint8 HWC batches. Jitter, noise, normalisation and
the float conversion then run in torch on the same device (pipeline.augment): on the CPU, DALI's
own colour operators measured 4-5x slower than the decode they follow (color_twist or hsv +
brightness_contrast: ~500 RGB samples/s against ~2,500/s for decoding alone, same run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline.config import LoaderConfig, LoaderError
from pipeline.source import Shard, find_undecodable
from sharding.shard_format import IMAGE_EXTS, PARTS

log = logging.getLogger(__name__)

OUTPUTS = (*PARTS, "key")


def shard_paths(shards: list[Shard]) -> tuple[list[str], list[str] | None]:
    """Tar paths, and their indexes only if every shard has one (DALI takes all or none)."""
    paths = [s.path for s in shards]
    return paths, ([s.index for s in shards] if all(s.index for s in shards) else None)


def decode_and_resize(encoded, output_type, size, stored_size, gpu: bool):
    """Decode one JPEG stream to uint8 HWC, resizing only when the stored size differs."""
    images = fn.decoders.image(
        encoded,
        device="mixed" if gpu else "cpu",
        output_type=output_type,
        jpeg_fancy_upsampling=True,  # chroma upsampling as libjpeg-turbo/PIL do: same pixels
    )
    if tuple(stored_size) != (size, size):
        images = fn.resize(images, size=[size, size], antialias=True)
    # No fn.transpose to CHW here: on the CPU it cost 24% of the RGB throughput (measured);
    # torch does the transpose for free inside its uint8 -> float cast.
    return images


@pipeline_def
def shard_pipeline(
    paths, index_paths, channels, sizes, image_size, depth_size, gpu, shard, shuffle, fill, key_len
):
    """Read the four JPEGs of each sample plus its key (as padded bytes of its source info)."""
    shard_id, num_shards = shard
    bg, fg_bg, mask, depth = fn.readers.webdataset(
        name="Reader",  # the iterator needs the name to know where the epoch ends
        paths=paths,
        index_paths=index_paths,
        ext=list(IMAGE_EXTS),
        missing_component_behavior="error",
        random_shuffle=shuffle,
        initial_fill=fill,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,  # the epoch's end comes from this reader's metadata; trim the pad
    )
    # "path:offset:key.bg.jpg", padded to a fixed length so that it batches like a tensor.
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
    rows = padded.cpu().numpy().tobytes()  # keys stay on the host even in a GPU pipeline
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
    """Yield (uint8 (B, H, W, C) tensors by part, keys) for one epoch of this rank.

    On the CPU the tensors alias DALI's output buffers (no copy) and are valid only until the
    next batch is requested; ``Loader.epoch`` turns them into new float tensors first.
    """
    gpu = cfg.device.startswith("cuda")
    device_id = None
    if gpu:
        device_id = torch.device(cfg.device).index
        device_id = torch.cuda.current_device() if device_id is None else device_id
    paths, index_paths = shard_paths(shards)
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
        # "path:offset:member"; a tar member name is at most 256 bytes.
        key_len=max(len(p) for p in paths) + 1 + 20 + 1 + 256,
        batch_size=cfg.batch_size,
        num_threads=max(1, cfg.num_threads),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=2,
    )
    where = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more shards)"
    try:
        pipe.build()
        if gpu:
            policy = LastBatchPolicy.DROP if cfg.last_batch == "drop" else LastBatchPolicy.PARTIAL
            batches = (
                outputs[0]
                for outputs in DALIGenericIterator(
                    pipe,
                    list(OUTPUTS),
                    reader_name="Reader",
                    last_batch_policy=policy,
                    auto_reset=False,
                )
            )
        else:
            batches = _cpu_batches(pipe, rank_samples, cfg.batch_size, cfg.last_batch)
    except RuntimeError as exc:
        raise LoaderError(f"{where}: DALI cannot read the shards: {_reason(exc)}") from exc
    try:
        for batch in batches:
            keys = _keys(batch.pop("key"))
            yield batch, keys
    except LoaderError:  # already says what is wrong (it is a RuntimeError too)
        raise
    except RuntimeError as exc:
        reason = _reason(exc)
        if "decoders.image" in str(exc):
            # DALI does not say which sample failed; find it so the message names the file.
            culprit = find_undecodable(shards)
            if culprit:
                raise LoaderError(f"{culprit}; DALI said: {reason}") from exc
        raise LoaderError(f"{where}: DALI failed mid-epoch: {reason}") from exc
    finally:
        del batches, pipe


def _cpu_batches(pipe, rank_samples: int, batch_size: int, last_batch: str) -> Iterator[dict]:
    """One epoch of zero-copy CPU batches, its end taken from the named reader's metadata.

    DALIGenericIterator would copy every batch into fresh torch tensors: 18 us/sample of a
    single-channel sample's ~360 us (measured), for no benefit on the CPU.
    """
    meta = pipe.reader_meta("Reader")
    total, shards, shard_id = meta["epoch_size"], meta["number_of_shards"], meta["shard_id"]
    dali_samples = total * (shard_id + 1) // shards - total * shard_id // shards
    if dali_samples != rank_samples:
        raise LoaderError(
            f"DALI's reader holds {dali_samples} samples for shard {shard_id} of {shards}, the "
            f"shard list says {rank_samples}; the shards changed since the loader was built"
        )
    full, rest = divmod(rank_samples, batch_size)
    count = full + (1 if rest and last_batch == "partial" else 0)
    for i in range(count):
        outputs = pipe.run()
        # pad_last_batch repeats the last sample to fill the final batch; drop the repeats.
        valid = batch_size if i < full else rest
        yield {name: _as_torch(out)[:valid] for name, out in zip(OUTPUTS, outputs)}


def _as_torch(tensor_list) -> torch.Tensor:
    """A torch view of a dense DALI CPU batch (a copy only if DALI left it scattered)."""
    if tensor_list.is_dense_tensor():
        return torch.from_numpy(np.asarray(tensor_list.as_tensor()))
    return torch.from_numpy(np.stack([np.asarray(t) for t in tensor_list]))


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
        name="Reader", paths=paths, index_paths=index_paths, ext=list(IMAGE_EXTS)
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
    paths, index_paths = shard_paths(shards)
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
