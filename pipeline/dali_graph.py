"""The DALI graphs: what runs per batch, on the pipeline's device. Only this module and
``pipeline.dali`` import nvidia.dali (callers import them lazily).

The loader graph takes each batch from one Python callback (``pipeline.dali.Feed``): the four
JPEG streams of every sample, cut from the memory-mapped tars in the order's sample numbers,
and, when it augments, one (B, K) float array of per-sample parameters (``pipeline.params``).
Every external-source output is one CPU operator, and they are the graph's only CPU operators:
decoding is ``mixed`` (nvJPEG and the hardware decoder) on a GPU, and the parameters go to the
device once, where subscripts and arithmetic apply them. So the CPU stage is a handful of
operators whatever the data, grey or RGB (``cpu_operator_count`` counts them without a GPU),
where drawing the parameters with DALI's random and arithmetic operators took 155 serial CPU
operators per RGB batch. In a CPU pipeline (``device_id=None``) the same graph runs on CPU
operators.

What comes out depends on ``float_out``:

- True (``augment_in="dali"``, the default on CUDA): the float cast, jitter, noise, clip and
  normalisation run here: float32 NHWC out, which the loader views as channels_last NCHW.
- False: uint8 HWC out; ``pipeline.augment`` finishes the batch in torch.

Which samples get noise, and every jitter factor, come from the parameters, so both paths
agree on them; the noise values themselves are DALI's normals, drawn from the pipeline's seed
and a generator state that runs on across epochs (the torch path slices a fixed bank instead),
one draw for bg and fg_bg together under paired jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from pipeline.params import INPUTS, LUMA, MASK_THRESHOLD, packed_width, part_channels
from sharding.shard_format import IMAGE_EXTS, PARTS


@dataclass(frozen=True)
class DecoderHints:
    """Settings of the ``mixed`` JPEG decoder for small images (ignored on the CPU)."""

    hw_decoder_load: float  # share of each batch for the hardware decoder, the rest on CUDA
    preallocate: int  # side of the images to preallocate decoder buffers for, in pixels
    memory_padding: int  # bytes of slack on each device and pinned host buffer


@dataclass(frozen=True)
class GraphSpec:
    """Everything the loader graph computes, for one split of one loader."""

    channels: int  # of bg and fg_bg
    sizes: dict  # part -> (height, width) as stored
    image_size: int
    depth_size: int
    float_out: bool  # augment_in == "dali": float batches out; else uint8
    augmented: tuple[str, ...]  # parts with per-sample parameters, in packed order; () if none
    mean: float
    std: float
    noise: bool  # add Gaussian noise where a sample's noise scale is not 0
    paired_noise: bool  # bg and fg_bg get the same noise values (LoaderConfig.paired_jitter)
    flip: bool  # mirror the samples the feed flags (one more feed output)
    object_jitter: bool  # the packed parameters end with each object's gain and shift
    gpu: bool
    decoder: DecoderHints

    @property
    def params(self) -> bool:
        """Whether the feed sends a parameter array with each batch."""
        return self.float_out and bool(self.augmented)

    @property
    def feed_outputs(self) -> int:
        """The feed's outputs: four JPEG streams, the parameters, the flip flags."""
        return len(PARTS) + int(self.params) + int(self.flip)


def decode_and_resize(encoded, output_type, size: int, stored: tuple, spec: GraphSpec):
    """Decode one JPEG stream to uint8 HWC, resizing only when the stored size differs."""
    hints = {}
    if spec.gpu:
        d = spec.decoder
        hints = dict(
            hw_decoder_load=d.hw_decoder_load,
            preallocate_width_hint=d.preallocate,
            preallocate_height_hint=d.preallocate,
            device_memory_padding=d.memory_padding,
            host_memory_padding=d.memory_padding,
        )
    images = fn.decoders.image(
        encoded,
        device="mixed" if spec.gpu else "cpu",
        output_type=output_type,
        jpeg_fancy_upsampling=True,  # chroma upsampling as libjpeg-turbo/PIL do: same pixels
        **hints,
    )
    if tuple(stored) != (size, size):
        images = fn.resize(images, size=[size, size], antialias=True)
    # No fn.transpose to CHW: on the CPU it cost 24% of the RGB throughput (measured), and
    # NHWC is channels_last for the model anyway.
    return images


def apply_affine(images, channels: int, mean: float, std: float, params, at: int, normals=None):
    """uint8 HWC -> float32 HWC = clip(M x + grey(x) w + bias [+ noise]) for one part.

    ``normals``: N(0, 1) per pixel, of the images' shape, scaled per sample into the noise;
    None for no noise.

    ``params`` is the batch's packed parameter array on the pipeline's device and ``at`` this
    part's first column in it (``pipeline.params.pack``); ``None`` gives the plain
    ``x / (255 std) - mean / std`` through the same arithmetic, so that zero-strength
    augmentation gives exactly the plain output.
    """
    bias = -mean / std
    low, high = (0.0 - mean) / std, (1.0 - mean) / std
    if params is None:
        return dmath.clamp(images * (1.0 / (255.0 * std)) + bias, low, high)
    c = channels
    if c == 1:
        out = images * params[at]
        means = fn.reductions.mean(images, axes=[0, 1], keep_dims=True, dtype=types.FLOAT)
    else:
        # Column k of M weighs input channel k in every output channel: (H, W, 1) * (3,)
        out = images[:, :, 0:1] * params[at : at + 3]
        out = out + images[:, :, 1:2] * params[at + 3 : at + 6]
        out = out + images[:, :, 2:3] * params[at + 6 : at + 9]
        means = fn.reductions.mean(images, axes=[0, 1], keep_dims=True, dtype=types.FLOAT)
        means = fn.coord_transform(means, M=list(LUMA))  # (1, 1, 1): the mean grey level
    out = out + means * params[at + c * c] + bias
    if normals is not None:  # scaled per sample: 0 where a sample draws no noise
        out = out + normals * params[at + c * c + 1]
    return dmath.clamp(out, low, high)


def apply_sample(decoded: dict, params, at: int, flips, spec: GraphSpec) -> dict:
    """Mirror the flagged samples (all four images) and jitter the object's pixels of fg_bg:
    ``pipeline.augment.apply_sample`` on the pipeline's device; ``at`` is the first column
    of the object's gain and shift in ``params``."""
    decoded = dict(decoded)
    if spec.flip:
        decoded = {part: fn.flip(images, horizontal=flips) for part, images in decoded.items()}
    if spec.object_jitter:
        fg_bg = decoded["fg_bg"]
        inside = decoded["mask"] > MASK_THRESHOLD  # (H, W, 1): every channel of the object
        jittered = dmath.clamp(fg_bg * params[at] + params[at + 1], 0.0, 255.0)
        decoded["fg_bg"] = fn.cast(fg_bg + inside * (jittered - fg_bg), dtype=types.UINT8)
    return decoded


def finish(decoded: dict, params, flips, spec: GraphSpec) -> dict:
    """The model's float batch from the decoded parts (``pipeline.augment.finish_batch``)."""
    at, columns = 0, {}
    for part in spec.augmented:
        columns[part] = at
        at += packed_width(part_channels(part, spec.channels))
    decoded = apply_sample(decoded, params, at, flips, spec)
    normals = {}
    for part in columns if spec.noise else ():
        shared = spec.paired_noise and part == "fg_bg"  # paired: bg's draw (bg comes first)
        normals[part] = (
            normals["bg"] if shared else fn.random.normal(decoded[part], dtype=types.FLOAT)
        )
    out = {}
    for part in PARTS:
        channels = part_channels(part, spec.channels)
        mean, std = (spec.mean, spec.std) if part in INPUTS else (0.0, 1.0)
        where = columns.get(part)
        part_params = None if where is None else params
        noise = normals.get(part)
        values = apply_affine(decoded[part], channels, mean, std, part_params, where, noise)
        if part == "mask":
            binary = values > 0.5 if where is not None else decoded[part] > MASK_THRESHOLD
            values = fn.cast(binary, dtype=types.FLOAT)
        out[part] = values
    return out


def feed_outputs(feed, spec: GraphSpec) -> list:
    """The feed's outputs: the four padded JPEG streams, and the parameters when augmenting.

    DALI copies each into its own buffer: one copy of a dense array. (``no_copy=True`` measured
    slower here: 6.8 against 4.4 ms per RGB batch of 512, interleaved, 2 cores, no GPU.)
    """
    return fn.external_source(source=feed, num_outputs=spec.feed_outputs, batch=True)


@pipeline_def
def loader_graph(feed, spec: GraphSpec):
    """One batch of the order: decode the four JPEGs of each sample and, with ``float_out``,
    finish it on the pipeline's device."""
    streams = feed_outputs(feed, spec)
    colour = types.RGB if spec.channels == 3 else types.GRAY
    decoded = {}
    for part, encoded in zip(PARTS, streams):
        output_type = colour if part in INPUTS else types.GRAY
        size = spec.depth_size if part == "depth" else spec.image_size
        decoded[part] = decode_and_resize(encoded, output_type, size, spec.sizes[part], spec)
    if not spec.float_out:
        return tuple(decoded[p] for p in PARTS)
    params = flips = None
    if spec.params:
        params = streams[len(PARTS)]
        params = params.gpu() if spec.gpu else params  # one copy per batch, then on the device
    if spec.flip:
        flips = streams[-1]  # stays on the CPU: fn.flip takes its per-sample flag from there
    out = finish(decoded, params, flips, spec)
    return tuple(out[p] for p in PARTS)


def cpu_operator_count(pipe) -> dict[str, int]:
    """Operators of a pipeline by device ("cpu", "mixed", "gpu"), from its graph alone: no
    GPU is needed to count a graph built for ``device_id=0``."""
    pipe._build_graph()  # DALI's own graph construction, without building the executor
    counts: dict[str, int] = {}
    for op in pipe._ops:
        counts[op._op.device] = counts.get(op._op.device, 0) + 1
    return counts


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
