"""The DALI backend's lifecycle: one pipeline per loader split, built once, fed the order.

A ``DaliPipeline`` builds ``pipeline.dali_graph.loader_graph`` once. Each epoch hands it this
rank's batches of the global order (``pipeline.order``) as sample numbers; its ``Feed`` turns
each into the four JPEG streams of every sample (copied from the memory-mapped tars into one
padded array per part, ``pipeline.samples``)
and the batch's packed augmentation parameters (``pipeline.params``), and DALI decodes and
finishes the batch while earlier ones are consumed (``LoaderConfig.prefetch`` batches ahead).
While a remote split's tars are still arriving (``pipeline.cache``), the feed waits, in this
process, for the tars of the batch it is asked for; DALI asks ``prefetch - 1`` batches ahead,
so the first batch comes once the tars of the first ``prefetch`` batches are local.
A new epoch is a new plan and a ``reset()``, never a rebuild: the decoders keep their nvJPEG
state and buffers. An epoch left half-read is drained (at most ``prefetch`` batches already
queued) before the next one starts. After a DALI error the pipeline is rebuilt.

DALI errors become ``LoaderError``: a decode failure names the damaged file, found among the
samples of the batch that failed, since the feed knows which samples each batch holds.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import LoaderConfig, LoaderError, resolve_threads
from pipeline.dali_graph import DecoderHints, GraphSpec, loader_graph
from pipeline.params import augmented_parts, batch_affines, draw_sample, pack
from pipeline.samples import SampleTable
from sharding.shard_format import PARTS

log = logging.getLogger(__name__)


def graph_spec(
    cfg: LoaderConfig, channels: int, sizes: dict, float_out: bool, augment: bool
) -> GraphSpec:
    """The loader graph for one split under ``cfg``."""
    return GraphSpec(
        channels=channels,
        sizes=sizes,
        image_size=cfg.image_size,
        depth_size=cfg.depth_size,
        float_out=float_out,
        augmented=augmented_parts(cfg) if augment and float_out else (),
        mean=cfg.mean,
        std=cfg.std,
        noise=augment and cfg.noise_std > 0,
        paired_noise=cfg.paired_jitter,
        flip=augment and float_out and cfg.flip,
        object_jitter=augment and float_out and cfg.object_jitter > 0,
        gpu=cfg.device.startswith("cuda"),
        decoder=DecoderHints(cfg.hw_decoder_load, cfg.decoder_prealloc, cfg.decoder_padding),
    )


class Feed:
    """The graph's external source: each call returns the next batch of the current plan
    (the four JPEG streams per sample, and the packed parameters), or raises StopIteration at
    the plan's end, which ends DALI's epoch."""

    def __init__(self, table: SampleTable, spec: GraphSpec, cfg: LoaderConfig):
        self.table, self.spec, self.cfg = table, spec, cfg
        self.epoch = 0
        self._pending: Iterator[np.ndarray] = iter(())
        self.sent: deque[np.ndarray] = deque()  # batches handed to DALI, not yet returned

    def plan(self, batches: list[np.ndarray], epoch: int) -> None:
        self._pending, self.epoch = iter(batches), epoch
        self.sent.clear()

    def stop(self) -> None:
        """End the current plan: the next call raises StopIteration."""
        self._pending = iter(())

    def __call__(self):
        indices = next(self._pending)  # StopIteration here ends DALI's epoch
        self.sent.append(indices)
        streams = self.table.padded(indices)
        if not self.spec.params:
            return tuple(streams)
        keys = self.table.keys_of(indices)
        affines = batch_affines(keys, self.cfg.seed, self.epoch, self.cfg, self.spec.channels)
        sample = draw_sample(keys, self.cfg.seed, self.epoch, self.cfg)
        params = pack(affines, self.spec.augmented, sample if self.spec.object_jitter else None)
        if not self.spec.flip:
            return (*streams, params)
        return (*streams, params, sample["flip"].astype(np.int32))


class DaliPipeline:
    """The DALI side of one ``Loader`` split: the pipeline, built once, and its epochs.

    ``epoch`` yields {part: tensor} per batch: with ``spec.float_out`` the model's float32
    (B, C, H, W) views of NHWC memory, otherwise uint8 (B, H, W, C) tensors for
    ``pipeline.augment.finish_batch`` (on the CPU these alias DALI's buffers and are valid
    only until the next batch is requested).
    """

    builds = 0  # pipelines built in this process, for the tests and the startup benchmark

    def __init__(self, table: SampleTable, spec: GraphSpec, cfg: LoaderConfig, seed: int):
        self.table, self.spec, self.cfg, self.seed = table, spec, cfg, seed
        self.feed = Feed(table, spec, cfg)
        self.pipe = None
        self._needs_reset = False
        self._unfinished = False

    def _build(self) -> None:
        cfg, spec = self.cfg, self.spec
        device_id = None
        if spec.gpu:
            device_id = torch.device(cfg.device).index
            device_id = torch.cuda.current_device() if device_id is None else device_id
        self.pipe = loader_graph(
            feed=self.feed,
            spec=spec,
            batch_size=cfg.batch_size,
            num_threads=max(1, resolve_threads(cfg)),
            device_id=device_id,
            seed=self.seed,
            prefetch_queue_depth=cfg.prefetch,
        )
        self.pipe.build()
        DaliPipeline.builds += 1
        self._needs_reset = self._unfinished = False

    def epoch(self, batches: list[np.ndarray], epoch: int) -> Iterator[dict]:
        """This rank's ``batches`` (sample numbers) of ``epoch``, decoded and finished."""
        if self.pipe is None:
            try:
                self._build()
            except RuntimeError as exc:
                where = self.table.paths[0]
                reason = _reason(exc)
                raise LoaderError(f"{where}: DALI cannot build the pipeline: {reason}") from None
        if self._unfinished:
            self._drain()
        self.feed.plan(batches, epoch)
        if self._needs_reset:
            self.pipe.reset()
        self._needs_reset = self._unfinished = True
        try:
            for _ in batches:
                outputs = self.pipe.run()
                self.feed.sent.popleft()
                yield self._convert(outputs)
            self._finish_epoch()
        except LoaderError:
            raise
        except RuntimeError as exc:
            failed = self.feed.sent[0] if self.feed.sent else batches[0]
            self.pipe = None  # a pipeline that failed is not reused
            raise self._explain(exc, failed) from exc

    def _finish_epoch(self) -> None:
        # The feed has raised StopIteration for the read-ahead past the plan's end; reading
        # it here leaves the pipeline ready for a reset.
        try:
            self.pipe.run()
        except StopIteration:
            self._unfinished = False
            return
        raise LoaderError("DALI returned more batches than the epoch holds")  # a bug, not data

    def _drain(self) -> None:
        """Read and drop what an abandoned epoch left queued, so the next starts clean."""
        self.feed.stop()
        try:
            for _ in range(self.cfg.prefetch + 1):
                self.pipe.run()
        except StopIteration:
            self._unfinished = False
            return
        except RuntimeError:
            pass
        self.pipe = None  # could not drain: build afresh
        self._build()

    def _convert(self, outputs) -> dict:
        batch = {}
        for part, out in zip(PARTS, outputs):
            tensor = _as_torch(out, self.spec.gpu)
            if self.spec.float_out:
                # (B, C, H, W) view of NHWC memory: channels_last, no copy
                tensor = tensor.permute(0, 3, 1, 2)
            batch[part] = tensor
        return batch

    def _explain(self, exc: RuntimeError, failed: np.ndarray) -> LoaderError:
        from pipeline.source import find_undecodable_samples

        reason = _reason(exc)
        culprit = find_undecodable_samples(self.table, failed)
        if culprit:
            return LoaderError(f"{culprit}; DALI said: {reason}")
        shards = sorted({self.table.paths[s] for s in self.table.shard[failed].tolist()})
        return LoaderError(
            f"{shards[0]}{f' (or {len(shards) - 1} more)' if len(shards) > 1 else ''}: "
            f"DALI failed mid-epoch: {reason}; check the shards with "
            "`python -m sharding.verify DIR --decode`"
        )


def _as_torch(tensor_list, gpu: bool) -> torch.Tensor:
    """A torch tensor of one DALI batch output: a view on the CPU (valid until the next run),
    a copy on the GPU on torch's current stream."""
    if gpu:
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        return to_torch_tensor(tensor_list.as_tensor(), copy=True)
    if tensor_list.is_dense_tensor():
        tensor = torch.from_numpy(np.asarray(tensor_list.as_tensor()))
    else:
        tensor = torch.from_numpy(np.stack([np.asarray(t) for t in tensor_list]))
    return tensor


_NOISE = ("Critical error in pipeline", "Current pipeline object is no longer valid")


def _reason(exc: BaseException) -> str:
    """The one informative line of a DALI error (it wraps the reason in an operator stack)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_NOISE)]
    return lines[-1] if lines else type(exc).__name__


def decode_only_batches(
    shards, channels: int, batch_size: int, num_threads: int, device_id: int | None = None
):
    """Endless decoded batches (DALI outputs, never copied out) for the benchmark's ceiling.

    ``device_id`` given: nvJPEG/hardware decoding on that GPU, the dali-gpu ceiling.
    """
    from pipeline.dali_graph import decode_only_pipeline

    paths = [s.path for s in shards]
    index_paths = [s.index for s in shards] if all(s.index for s in shards) else None
    pipe = decode_only_pipeline(
        paths=paths,
        index_paths=index_paths,
        channels=channels,
        gpu=device_id is not None,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=0,
        prefetch_queue_depth=2,
    )
    pipe.build()
    while True:
        # run() returns once this batch's outputs are ready (synchronised with the host), so
        # the count is of finished decodes, not queued ones.
        outputs = pipe.run()
        yield len(outputs[0])
