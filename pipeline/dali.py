"""The DALI backend: the only module that imports nvidia.dali (callers import it lazily).

DALI reads the shards and decodes the JPEGs (nvJPEG and the hardware decoder behind the
``mixed`` decoder on the GPU, libjpeg-turbo on CPU threads). What happens after decoding
depends on ``LoaderConfig.augment_in``, resolved by the ``Loader``:

- "dali" (the default on CUDA): the float cast, the scaling to [0, 1], the jitter, the noise
  and the normalisation run inside this graph on the pipeline's device (GPU operators after
  the mixed decoder, CPU operators in a CPU pipeline), so on the GPU they overlap the training
  step through DALI's prefetch queue. Batches come out as float32 NHWC; the ``permute`` to
  (B, C, H, W) is a channels_last view, which the model takes without a copy.
- "torch" (the default on the CPU): DALI hands over uint8 HWC and ``pipeline.augment`` does the
  rest in fused torch ops. On the CPU DALI's own colour operators measured 4-5x slower than the
  decode they follow (color_twist or hsv + brightness_contrast: ~500 RGB samples/s against
  ~2,500/s for decoding alone, same run), and this graph on CPU operators is slower still:
  `python -m benchmarks.loaders --loaders dali-cpu --both-augment-in --rounds 3 --batches 5`
  on 1,600 synthetic samples, batch 100, 2-core dev box, no GPU, 2026-11-28 (load ~2): grey
  1,477 samples/s through torch against 362 in the graph, RGB 669 against 71. Most of the RGB
  gap is CPU Gaussian noise, drawn for every pixel of every sample (stddev 0 where a sample
  gets none): 286 samples/s without noise in an ad-hoc run the same day.

The graph applies the same jitter as ``pipeline.augment`` (brightness, contrast about the mean
grey level, saturation and the grey-axis hue turn, folded into one per-sample affine map by
``fn.coord_transform``, then noise and one clip), but draws its parameters with DALI's random
operators, seeded from the pipeline seed: a given (seed, epoch, rank count) gives the same
batches twice, while the torch path's draws are a function of the sample key alone.

The test split is neither shuffled nor augmented, so its pipeline is built once per loader and
reset between evaluations. A train pipeline is built per epoch: the shard order is part of its
arguments and changes every epoch, and a reused reader would carry its shuffle and random
state over. What that costs: `python -m benchmarks.dali_startup --data DIR --epochs 4` on the
same data and machine gave 0.05-0.13 s per train epoch start over a steady batch (first batch
0.19-0.23 s against 0.07-0.17 s per later batch; the first epoch of a process pays ~1.2 s of
one-off DALI start-up), and ~0 for a reset test pipeline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline.augment import INPUTS, LUMA, TARGETS
from pipeline.config import LoaderConfig, LoaderError, resolve_threads
from pipeline.source import Shard, find_undecodable
from sharding.shard_format import IMAGE_EXTS, PARTS

log = logging.getLogger(__name__)

OUTPUTS = (*PARTS, "key")
# One (B, 5) float output per augmented part when LoaderConfig.return_params is set.
PARAM_FIELDS = ("brightness", "contrast", "saturation", "hue", "noise")
# Batches DALI prepares ahead of the one being consumed: on the GPU they overlap the step.
PREFETCH = 2


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
    # No fn.transpose to CHW: on the CPU it cost 24% of the RGB throughput (measured), and
    # NHWC is channels_last for the model anyway.
    return images


# ---------------------------------------------------------------------- augmentation in DALI


def _around(centre: float, spread: float):
    """A per-sample uniform draw in [centre - spread, centre + spread) (a CPU DataNode).

    At zero spread (or one too small for float32, where DALI rejects the empty range) a
    one-valued discrete draw returns ``centre`` exactly; it is still an operator, so every
    later operator gets the same automatic seed whatever the strengths.
    """
    low, high = np.float32(centre - spread), np.float32(centre + spread)
    if not low < high:
        return fn.random.uniform(values=[float(centre)])
    return fn.random.uniform(range=[float(low), float(high)])


def draw_params(cfg: LoaderConfig, colour: bool) -> dict:
    """Jitter factors and the noise flag for one image per sample, as per-sample CPU scalars.

    The same ranges as ``pipeline.augment.draw_params``; saturation 1 and hue 0 when not colour.
    """
    return {
        "brightness": _around(1.0, cfg.brightness),
        "contrast": _around(1.0, cfg.contrast),
        "saturation": _around(1.0, cfg.saturation if colour else 0.0),
        "hue": _around(0.0, cfg.hue if colour else 0.0),
        "noise": fn.cast(fn.random.coin_flip(probability=cfg.noise_prob), dtype=types.FLOAT),
    }


def colour_matrix(saturation, hue, gain):
    """gain x (hue turn @ saturation) as a per-sample (3, 3) CPU DataNode.

    ``pipeline.augment.colour_matrix`` in DALI arithmetic: since the turn maps grey to grey,
    entry (i, j) is s * turn[i, j] + (1 - s) * luma[j], with Rodrigues' formula for the turn
    about the grey axis: cos * I + sin * K / sqrt(3) + (1 - cos) / 3. At s = 1 and hue = 0 the
    off-diagonal entries are exactly 0 and the diagonal exactly ``gain``.
    """
    angle = hue * (2 * math.pi)
    cos, sin = dmath.cos(angle), dmath.sin(angle)
    common = saturation * (1.0 - cos) * (1.0 / 3.0)
    turn = saturation * sin * (1.0 / math.sqrt(3.0))
    cross = ((0, -1, 1), (1, 0, -1), (-1, 1, 0))  # the cross-product matrix of (1, 1, 1)
    entries = []
    for i in range(3):
        for j in range(3):
            entry = common + (1.0 - saturation) * LUMA[j]
            if i == j:
                entry = entry + saturation * cos
            if cross[i][j]:
                entry = entry + turn * float(cross[i][j])
            entries.append(gain * entry)
    return fn.reshape(fn.stack(*entries), shape=[3, 3])


def jitter_and_normalise(images, channels: int, mean: float, std: float, params, noise_std):
    """uint8 HWC -> float32 HWC = clip((jitter(x)/255 [+ noise] - mean) / std), per sample.

    ``params`` None: the plain conversion, through the same operators as the augmented one, so
    that zero-strength augmentation gives exactly the plain output.
    """
    scale = 1.0 / (255.0 * std)
    bias = -mean / std
    low, high = (0.0 - mean) / std, (1.0 - mean) / std
    if params is None:
        out = fn.coord_transform(images, M=scale, dtype=types.FLOAT) + bias
    else:
        brightness, contrast = params["brightness"], params["contrast"]
        gain = brightness * contrast * scale
        # Contrast blends with the mean grey level of the brightness-adjusted image; saturation
        # and hue map grey to grey, so one per-sample shift serves every channel.
        means = fn.reductions.mean(images, axes=[0, 1], keep_dims=True, dtype=types.FLOAT)
        if channels == 3:
            matrix = colour_matrix(params["saturation"], params["hue"], gain)
            grey = fn.coord_transform(means, M=list(LUMA))  # (1, 1, 1)
        else:
            matrix, grey = gain, means
        shift = grey * ((1.0 - contrast) * brightness * scale) + bias  # (1, 1, 1)
        out = fn.coord_transform(images, M=matrix, dtype=types.FLOAT) + shift
        if noise_std > 0:
            # stddev 0 on the samples not drawn for noise: they come out unchanged.
            out = fn.noise.gaussian(out, stddev=params["noise"] * (noise_std / std))
    return dmath.clamp(out, low, high)


def finish_in_graph(decoded: dict, channels: int, cfg: LoaderConfig, augment: bool):
    """The float batch of ``pipeline.augment.finish_batch``, built in the graph (NHWC).

    Returns ({part: float32 DataNode}, {augmented part: (5,) params DataNode}).
    """
    parts = (INPUTS + (TARGETS if cfg.augment_targets else ())) if augment else ()
    # Independent draws for every augmented image: bg and fg_bg never share factors.
    params = {part: draw_params(cfg, colour=channels == 3 and part in INPUTS) for part in parts}
    out = {}
    for part in INPUTS:
        out[part] = jitter_and_normalise(
            decoded[part], channels, cfg.mean, cfg.std, params.get(part), cfg.noise_std
        )
    if "mask" in params:
        jittered = jitter_and_normalise(decoded["mask"], 1, 0.0, 1.0, params["mask"], cfg.noise_std)
        mask = jittered > 0.5
    else:
        mask = decoded["mask"] > 127  # JPEG blurs the edges; 127 splits object from background
    out["mask"] = fn.cast(mask, dtype=types.FLOAT)
    out["depth"] = jitter_and_normalise(
        decoded["depth"], 1, 0.0, 1.0, params.get("depth"), cfg.noise_std
    )
    stacked = {part: fn.stack(*(p[f] for f in PARAM_FIELDS)) for part, p in params.items()}
    return out, stacked


# ------------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class Graph:
    """What one rank's pipeline reads and does; everything but batch size, threads and seed."""

    channels: int
    sizes: dict  # part -> (height, width) as stored
    shard: tuple[int, int]  # (shard_id, num_shards)
    shuffle: bool
    fill: int  # the reader's shuffle buffer
    in_graph: bool  # augment_in == "dali": float batches out; else uint8
    augment: bool
    cfg: LoaderConfig

    def output_names(self) -> list[str]:
        names = list(OUTPUTS)
        if self.in_graph and self.augment and self.cfg.return_params:
            parts = INPUTS + (TARGETS if self.cfg.augment_targets else ())
            names += [f"params_{part}" for part in parts]
        return names


@pipeline_def
def shard_pipeline(paths, index_paths, graph: Graph, gpu: bool, key_len: int):
    """Read the four JPEGs of each sample plus its key (as padded bytes of its source info)."""
    shard_id, num_shards = graph.shard
    cfg = graph.cfg
    bg, fg_bg, mask, depth = fn.readers.webdataset(
        name="Reader",  # the iterator needs the name to know where the epoch ends
        paths=paths,
        index_paths=index_paths,
        ext=list(IMAGE_EXTS),
        missing_component_behavior="error",
        random_shuffle=graph.shuffle,
        initial_fill=graph.fill,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,  # the epoch's end comes from this reader's metadata; trim the pad
        stick_to_shard=True,  # a reused pipeline reads this rank's shard again, not the next
    )
    # "path:offset:key.bg.jpg", padded to a fixed length so that it batches like a tensor.
    key = fn.pad(fn.get_property(bg, key="source_info"), axes=[0], shape=[key_len])
    colour = types.RGB if graph.channels == 3 else types.GRAY
    sizes = graph.sizes
    decoded = {
        "bg": decode_and_resize(bg, colour, cfg.image_size, sizes["bg"], gpu),
        "fg_bg": decode_and_resize(fg_bg, colour, cfg.image_size, sizes["fg_bg"], gpu),
        "mask": decode_and_resize(mask, types.GRAY, cfg.image_size, sizes["mask"], gpu),
        "depth": decode_and_resize(depth, types.GRAY, cfg.depth_size, sizes["depth"], gpu),
    }
    if not graph.in_graph:
        return (*(decoded[p] for p in PARTS), key)
    out, params = finish_in_graph(decoded, graph.channels, cfg, graph.augment)
    wanted = [n.removeprefix("params_") for n in graph.output_names()[len(OUTPUTS) :]]
    return (*(out[p] for p in PARTS), key, *(params[p] for p in wanted))


def _keys(padded: torch.Tensor) -> list[str]:
    rows = padded.cpu().numpy().tobytes()  # keys stay on the host even in a GPU pipeline
    width = padded.shape[1]
    keys = []
    for start in range(0, len(rows), width):
        info = rows[start : start + width].rstrip(b"\0").decode()
        keys.append(info.rsplit(":", 1)[-1].split(".", 1)[0])
    return keys


class _Run:
    """One built pipeline over one shard list, with its epoch iteration."""

    def __init__(self, shards: list[Shard], graph: Graph, seed: int, rank_samples: int):
        cfg = graph.cfg
        self.shards, self.graph, self.rank_samples = tuple(shards), graph, rank_samples
        self.gpu = cfg.device.startswith("cuda")
        device_id = None
        if self.gpu:
            device_id = torch.device(cfg.device).index
            device_id = torch.cuda.current_device() if device_id is None else device_id
        paths, index_paths = shard_paths(shards)
        self.pipe = shard_pipeline(
            paths=paths,
            index_paths=index_paths,
            graph=graph,
            gpu=self.gpu,
            # "path:offset:member" in bytes (UTF-8: a non-ASCII path is longer than its str);
            # a tar member name is at most 256 bytes.
            key_len=max(len(p.encode()) for p in paths) + 1 + 20 + 1 + 256,
            batch_size=cfg.batch_size,
            num_threads=max(1, resolve_threads(cfg)),
            device_id=device_id,
            seed=seed,
            prefetch_queue_depth=PREFETCH,
        )
        self.names = graph.output_names()
        self.pipe.build()
        self.iterator = None
        if self.gpu:
            policy = LastBatchPolicy.DROP if cfg.last_batch == "drop" else LastBatchPolicy.PARTIAL
            # Hands each output over as a torch tensor (zero-copy with DALI's dynamic executor).
            # note: each batch waits on the host until DALI's GPU work for it is done; with
            # PREFETCH batches queued ahead, that work overlaps the training step.
            self.iterator = DALIGenericIterator(
                self.pipe, self.names, reader_name="Reader", last_batch_policy=policy
            )

    def batches(self, drain: bool) -> Iterator[dict]:
        """This epoch's batches as {output name: torch tensor}, trimmed to the real samples.

        ``drain``: also read the reader's dropped partial batch, so that the next epoch of
        this pipeline starts at its first sample.
        """
        if self.iterator is not None:
            # iter() resets the iterator after a finished epoch (DALI's plugin does that).
            # The reader pads each shard to the longest one and to whole batches; the plugin
            # trims most of that, but can hand over an empty last batch: trim to this rank's
            # samples here, as the CPU path does.
            seen, size = 0, self.graph.cfg.batch_size
            for outputs in self.iterator:
                batch = outputs[0]
                valid = min(len(batch["key"]), self.rank_samples - seen)
                if valid <= 0 or (valid < size and self.graph.cfg.last_batch == "drop"):
                    continue
                seen += valid
                yield (
                    batch
                    if valid == len(batch["key"])
                    else {k: v[:valid] for k, v in batch.items()}
                )
            return
        cfg = self.graph.cfg
        meta = self.pipe.reader_meta("Reader")
        total, shards, shard_id = meta["epoch_size"], meta["number_of_shards"], meta["shard_id"]
        dali_samples = total * (shard_id + 1) // shards - total * shard_id // shards
        if dali_samples != self.rank_samples:
            raise LoaderError(
                f"DALI's reader holds {dali_samples} samples for shard {shard_id} of {shards}, "
                f"the shard list says {self.rank_samples}; the shards changed since the loader "
                "was built"
            )
        full, rest = divmod(self.rank_samples, cfg.batch_size)
        count = full + (1 if rest and cfg.last_batch == "partial" else 0)
        for i in range(count):
            outputs = self.pipe.run()
            # pad_last_batch repeats the last sample to fill the final batch; drop the repeats.
            valid = cfg.batch_size if i < full else rest
            yield {name: _as_torch(out)[:valid] for name, out in zip(self.names, outputs)}
        if drain and rest and cfg.last_batch == "drop":
            self.pipe.run()


def _as_torch(tensor_list) -> torch.Tensor:
    """A torch view of a dense DALI CPU batch (a copy only if DALI left it scattered)."""
    if tensor_list.is_dense_tensor():
        return torch.from_numpy(np.asarray(tensor_list.as_tensor()))
    return torch.from_numpy(np.stack([np.asarray(t) for t in tensor_list]))


class DaliEpochs:
    """The DALI side of one ``Loader``: builds (or reuses) a pipeline per epoch.

    ``epoch`` yields dicts: with ``in_graph`` the model's batch (float32 (B, C, H, W) views of
    NHWC memory, "key", and "params" when asked for); otherwise uint8 (B, H, W, C) tensors by
    part and "key", for ``pipeline.augment.finish_batch``. On the CPU the uint8 tensors alias
    DALI's buffers and are valid only until the next batch is requested.
    """

    def __init__(self, graph: Graph, rank_samples: int, total_samples: int):
        self.graph, self.rank_samples = graph, rank_samples
        # Only an unshuffled, unaugmented split (the test split) reads the same batches every
        # epoch, so only its pipeline is kept; a train epoch's shard order is a pipeline
        # argument, and its reader shuffle and random state would carry over.
        # Ranks with unequal sample counts leave the reader's padding unread at an epoch's end,
        # which would shift the next epoch of a kept pipeline: keep it only for equal shares.
        equal = rank_samples * graph.shard[1] == total_samples
        self.reusable = not graph.shuffle and not graph.augment and equal
        self._kept: _Run | None = None

    def epoch(self, shards: list[Shard], seed: int) -> Iterator[dict]:
        """One epoch of this rank's batches over ``shards`` (in that order)."""
        where = (
            shards[0].path
            if len(shards) == 1
            else f"{shards[0].path} (+{len(shards) - 1} more shards)"
        )
        run, self._kept = self._kept, None  # taken: a second epoch meanwhile builds its own
        if run is None or run.shards != tuple(shards):
            try:
                run = _Run(shards, self.graph, seed, self.rank_samples)
            except RuntimeError as exc:
                raise LoaderError(f"{where}: DALI cannot read the shards: {_reason(exc)}") from exc
        finished = False
        try:
            for outputs in run.batches(drain=self.reusable):
                yield self._convert(outputs, run.gpu)
            finished = True
        except LoaderError:  # already says what is wrong (it is a RuntimeError too)
            raise
        except RuntimeError as exc:
            reason = _reason(exc)
            if "decoders.image" in str(exc):
                # DALI does not say which sample failed; find it so the message names the file.
                culprit = find_undecodable(list(shards))
                if culprit:
                    raise LoaderError(f"{culprit}; DALI said: {reason}") from exc
            raise LoaderError(f"{where}: DALI failed mid-epoch: {reason}") from exc
        finally:
            # An epoch left half-read cannot be rewound (DALI resets only at an epoch's end):
            # drop that pipeline, and build a fresh one next time.
            if finished and self.reusable:
                self._kept = run
            del run

    def _convert(self, outputs: dict, gpu: bool) -> dict:
        batch = {"key": _keys(outputs["key"])}
        if not self.graph.in_graph:
            batch.update((p, outputs[p]) for p in PARTS)
            return batch
        for part in PARTS:
            nchw = outputs[part].permute(0, 3, 1, 2)  # (B, C, H, W), channels_last memory
            # On the CPU DALI reuses its output buffers: copy, keeping the NHWC memory order.
            batch[part] = nchw if gpu else nchw.clone()
        cfg = self.graph.cfg
        if cfg.return_params:
            batch["params"] = {
                name.removeprefix("params_"): _params_dict(values)
                for name, values in outputs.items()
                if name.startswith("params_")
            }
        return batch

    def close(self) -> None:
        """Release a kept pipeline (and its device memory)."""
        self._kept = None


def _params_dict(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 5) drawn parameters -> {field: (B,)}, with the noise flag as bool."""
    values = values.cpu()
    params = {f: values[:, i].clone() for i, f in enumerate(PARAM_FIELDS)}
    params["noise"] = params["noise"] > 0.5
    return params


_NOISE = ("Critical error in pipeline", "Current pipeline object is no longer valid")


def _reason(exc: BaseException) -> str:
    """The one informative line of a DALI error (it wraps the reason in an operator stack)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_NOISE)]
    return lines[-1] if lines else type(exc).__name__


# ------------------------------------------------------------------------ decode-only ceiling


@pipeline_def
def decode_only_pipeline(paths, index_paths, channels, gpu):
    """The four JPEG decodes per sample and nothing else: the decode ceiling (mixed on CUDA)."""
    bg, fg_bg, mask, depth = fn.readers.webdataset(
        name="Reader", paths=paths, index_paths=index_paths, ext=list(IMAGE_EXTS)
    )
    colour = types.RGB if channels == 3 else types.GRAY
    device = "mixed" if gpu else "cpu"
    return (
        fn.decoders.image(bg, device=device, output_type=colour, jpeg_fancy_upsampling=True),
        fn.decoders.image(fg_bg, device=device, output_type=colour, jpeg_fancy_upsampling=True),
        fn.decoders.image(mask, device=device, output_type=types.GRAY, jpeg_fancy_upsampling=True),
        fn.decoders.image(depth, device=device, output_type=types.GRAY, jpeg_fancy_upsampling=True),
    )


def decode_only_batches(
    shards: list[Shard],
    channels: int,
    batch_size: int,
    num_threads: int,
    device_id: int | None = None,
):
    """Endless decoded batches (DALI outputs, never copied out) for the benchmark's ceiling.

    ``device_id`` given: nvJPEG/hardware decoding on that GPU, the dali-gpu ceiling.
    """
    paths, index_paths = shard_paths(shards)
    pipe = decode_only_pipeline(
        paths=paths,
        index_paths=index_paths,
        channels=channels,
        gpu=device_id is not None,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=0,
        prefetch_queue_depth=PREFETCH,
    )
    pipe.build()
    while True:
        # run() returns once this batch's outputs are ready (synchronised with the host), so
        # the count is of finished decodes, not queued ones.
        outputs = pipe.run()
        yield len(outputs[0])
