"""Augmentation inside the DALI graph (augment_in="dali"), pipeline reuse, operator counts.

The CPU graph runs here; the same graph on CUDA (mixed decode, GPU operators) is counted by
device without a GPU, and run in the ``gpu``-marked tests at the end. The reference is the
torch path, ``pipeline.augment``; both take their parameters from ``pipeline.params``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline import LoaderConfig, LoaderError, build_loader, denormalize
from pipeline.augment import to_float
from pipeline.config import resolve_threads
from pipeline.loader import dali_available, resolve_augment_in
from pipeline.params import affine, draw_params
from sharding.shard_format import PARTS
from tests.conftest import run_cli

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# In-graph DALI on CPU threads; batches of 4, so the 32 train samples are 8 whole batches.
GRAPH = LoaderConfig(
    backend="dali",
    augment_in="dali",
    batch_size=4,
    num_threads=2,
    seed=3,
    rank=0,
    world_size=1,
)
ZERO = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, noise_std=0.0)


def collect(loader, epoch: int = 0) -> dict[str, dict]:
    """{key: {part: tensor, "params": {part: {field: value}}}} for one epoch."""
    samples = {}
    for batch in loader.epoch(epoch):
        for i, key in enumerate(batch["key"]):
            assert key not in samples, f"{key} seen twice in one epoch"
            samples[key] = {p: batch[p][i] for p in PARTS}
            samples[key]["params"] = {
                part: {field: values[i] for field, values in fields.items()}
                for part, fields in batch.get("params", {}).items()
            }
    return samples


def as_lists(loader, epoch: int) -> list[dict]:
    return [{k: batch[k] for k in ("key", *PARTS)} for batch in loader.epoch(epoch)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert all(torch.equal(x[p], y[p]) for p in PARTS)


def pixels(plain: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """The decoded uint8 (H, W, C) image back from a plain (unaugmented) in-graph output."""
    return (denormalize(plain, cfg) * 255).round().to(torch.uint8).permute(1, 2, 0)


# -------------------------------------------------------------------------- the batch contract


@needs_dali
@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_graph_batches_keep_the_torch_path_contract(augment, rgb, tiny_shards, tiny_shards_rgb):
    """With noise off, the graph and the torch path give the same batch for the same keys,
    augmented or not: one set of parameters, applied on either side."""
    data = tiny_shards_rgb if rgb else tiny_shards
    cfg = replace(GRAPH, augment=augment, noise_std=0.0)
    loader = build_loader(data, "train", cfg)
    assert loader.augment_in == "dali"
    reference = build_loader(data, "train", replace(cfg, augment_in="torch"))
    assert reference.augment_in == "torch"
    batches = list(loader.epoch(0))
    expected = list(reference.epoch(0))
    assert [b["key"] for b in batches] == [b["key"] for b in expected]  # one order
    channels = 3 if rgb else 1
    for batch, ref in zip(batches, expected):
        assert set(batch) == set(ref)
        for part in PARTS:
            assert batch[part].shape == ref[part].shape, part
            assert batch[part].dtype == ref[part].dtype == torch.float32, part
            # NHWC memory seen as NCHW: the model takes it without a copy
            assert batch[part].is_contiguous(memory_format=torch.channels_last), part
            # within 1/255 in pixel units: the same decoder, the same arithmetic reordered
            scale = cfg.std if part in ("bg", "fg_bg") else 1.0
            assert (batch[part] - ref[part]).abs().max() * scale < 1 / 255, part
        assert batch["bg"].shape[1] == channels
        assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
        assert batch["depth"].min() >= 0 and batch["depth"].max() <= 1
        bg = denormalize(batch["bg"], cfg)
        assert bg.min() >= 0 and bg.max() <= 1


@needs_dali
@pytest.mark.parametrize("where", ["dali", "torch"])
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_flip_and_object_jitter_follow_the_draws(where, rgb, tiny_shards, tiny_shards_rgb):
    """Flagged samples come out mirrored, all four images alike; the object jitter changes
    fg_bg inside the mask only, by the drawn gain and shift; the graph and the torch path
    agree within 1/255 on every part."""
    data = tiny_shards_rgb if rgb else tiny_shards
    # No saturation or hue: the colour jitter is then one gain per image, easy to undo.
    cfg = replace(GRAPH, noise_std=0.0, saturation=0.0, hue=0.0, return_params=True)
    cfg = replace(cfg, augment_in=where)
    plain = collect(build_loader(data, "train", cfg))
    flipped = collect(build_loader(data, "train", replace(cfg, flip=True)))
    jittered = collect(build_loader(data, "train", replace(cfg, object_jitter=0.5)))
    both = replace(cfg, flip=True, object_jitter=0.5)
    if where == "dali":
        reference = collect(build_loader(data, "train", replace(both, augment_in="torch")))
        for key, sample in collect(build_loader(data, "train", both)).items():
            for part in PARTS:
                scale = cfg.std if part in ("bg", "fg_bg") else 1.0
                assert (sample[part] - reference[key][part]).abs().max() * scale < 1 / 255
    mirrored = 0
    for key, sample in flipped.items():
        flip = bool(sample["params"]["sample"]["flip"])
        mirrored += flip
        for part in PARTS:
            expected = plain[key][part].flip(-1) if flip else plain[key][part]
            assert torch.equal(sample[part], expected), (key, part, flip)
    assert 0 < mirrored < len(flipped)
    levels = collect(build_loader(data, "train", replace(cfg, augment=False)))
    low, high = -cfg.mean / cfg.std, (1 - cfg.mean) / cfg.std
    changed = 0
    for key, sample in jittered.items():
        inside = plain[key]["mask"].bool().expand_as(sample["fg_bg"])
        assert torch.equal(sample["bg"], plain[key]["bg"]) and torch.equal(
            sample["mask"], plain[key]["mask"]
        )
        # Outside the object only contrast's blend with the image's mean grey moves: by one
        # constant, since the object's new pixels moved that mean (where nothing is clipped).
        unclipped = (plain[key]["fg_bg"] > low + 0.1) & (plain[key]["fg_bg"] < high - 0.1)
        outside = (sample["fg_bg"] - plain[key]["fg_bg"])[~inside & unclipped]
        assert outside.max() - outside.min() < 1e-4, key
        drawn, colour = sample["params"]["sample"], sample["params"]["fg_bg"]
        gain = float(colour["brightness"] * colour["contrast"])
        moved = (sample["fg_bg"] - plain[key]["fg_bg"] - outside.mean()) * cfg.std * 255 / gain
        before = (levels[key]["fg_bg"] * cfg.std + cfg.mean) * 255  # grey levels, unaugmented
        g, s = float(drawn["object_gain"]), float(drawn["object_shift"])
        free = inside & (before * g + s > 1) & (before * g + s < 254)
        free &= (sample["fg_bg"] > low) & (sample["fg_bg"] < high) & unclipped
        if free.any():
            changed += 1
            assert (moved - (before * (g - 1) + s))[free].abs().max() < 1.5, key
    assert changed > len(jittered) // 2


@needs_dali
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_graph_and_torch_path_add_noise_to_the_same_samples(rgb, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    cfg = replace(GRAPH, noise_prob=0.5, return_params=True)
    quiet = collect(build_loader(data, "train", replace(cfg, noise_std=0.0)))
    noisy = {
        where: collect(build_loader(data, "train", replace(cfg, augment_in=where)))
        for where in ("dali", "torch")
    }
    flagged = 0
    for key, sample in noisy["dali"].items():
        for part in ("bg", "fg_bg"):
            drew = bool(sample["params"][part]["noise"])
            assert drew == bool(noisy["torch"][key]["params"][part]["noise"]), (key, part)
            flagged += drew
            for where, samples in noisy.items():
                residual = (samples[key][part] - quiet[key][part]).abs().mean()
                assert (residual > 1e-3) == drew, (key, part, where)
    assert 0 < flagged < 2 * len(noisy["dali"])


@needs_dali
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_zero_strength_is_exactly_the_plain_output(rgb, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    plain = collect(build_loader(data, "train", replace(GRAPH, augment=False)))
    zero = collect(build_loader(data, "train", replace(GRAPH, augment_targets=True, **ZERO)))
    assert plain.keys() == zero.keys() and len(plain) == 32
    for key in plain:
        for part in PARTS:
            assert torch.equal(zero[key][part], plain[key][part]), (key, part)


@needs_dali
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rgb=st.booleans(),
    brightness=st.floats(0.0, 0.5),
    contrast=st.floats(0.0, 0.5),
    saturation=st.floats(0.0, 0.5),
    hue=st.floats(0.0, 0.5),
    seed=st.integers(0, 1000),
)
@example(rgb=True, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.2, seed=1)
@example(rgb=False, brightness=0.3, contrast=0.3, saturation=0.0, hue=0.0, seed=2)
def test_graph_applies_the_torch_formula_to_its_draws(
    rgb, brightness, contrast, saturation, hue, seed, tiny_shards, tiny_shards_rgb
):
    """For any strengths: every factor lies in its range, and the graph's output for the
    factors it drew is ``pipeline.augment.to_float`` of the same pixels with those factors."""
    data = tiny_shards_rgb if rgb else tiny_shards
    strengths = dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
    cfg = replace(GRAPH, seed=seed, noise_std=0.0, return_params=True, batch_size=8, **strengths)
    plain = collect(build_loader(data, "train", replace(cfg, augment=False)))
    batch = next(iter(build_loader(data, "train", cfg).epoch(0)))
    for part in ("bg", "fg_bg"):
        params = batch["params"][part]
        for name in ("brightness", "contrast"):
            spread = strengths[name]
            assert ((params[name] >= 1 - spread) & (params[name] <= 1 + spread)).all()
        if rgb:
            assert ((params["saturation"] - 1).abs() <= saturation).all()
            assert (params["hue"].abs() <= hue).all()
        else:
            assert (params["saturation"] == 1).all() and (params["hue"] == 0).all()
        raw = torch.stack([pixels(plain[key][part], cfg) for key in batch["key"]])
        drawn = {name: values.numpy() for name, values in params.items()}
        expected = to_float(raw, cfg.mean, cfg.std, affine(drawn, raw.shape[-1], cfg.std, 0.0))
        # float32 arithmetic in another order; 1e-4 is 1/150 of a grey level here
        assert (batch[part] - expected).abs().max() < 1e-4, part


# ------------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def many_draws(tiny_shards_rgb) -> dict:
    """The graph's parameters for 12 epochs x 32 samples (RGB), per part."""
    loader = build_loader(tiny_shards_rgb, "train", replace(GRAPH, return_params=True))
    draws = {"bg": [], "fg_bg": []}
    for epoch in range(12):
        for batch in loader.epoch(epoch):
            for part in draws:
                draws[part].append(batch["params"][part])
    return {
        part: {f: torch.cat([d[f] for d in chunks]) for f in chunks[0]}
        for part, chunks in draws.items()
    }


@needs_dali
def test_drawn_factors_spread_like_the_torch_paths(many_draws):
    keys = [f"batch1-{i}_{i % 7}_{i % 2}_{i % 3}" for i in range(len(many_draws["bg"]["hue"]))]
    reference = draw_params(keys, seed=0, epoch=0, cfg=GRAPH, channels=3)
    for part in ("bg", "fg_bg"):
        drawn, ref = many_draws[part], reference[part]
        assert len(drawn["brightness"]) == 12 * 32
        for name, spread in (("brightness", 0.075), ("contrast", 0.075), ("saturation", 0.075)):
            values = drawn[name]
            assert values.min() >= 1 - spread and values.max() <= 1 + spread, name
            # uniform on [1 - x, 1 + x]: std x / sqrt(3) = 0.043; 384 draws, within 15%
            assert abs(values.std() / ref[name].std() - 1) < 0.15, name
            assert abs(values.mean() - 1) < 0.01, name
        assert drawn["hue"].abs().max() <= 0.075
        assert abs(drawn["hue"].std() / ref["hue"].std() - 1) < 0.15
        share = drawn["noise"].float().mean().item()
        assert abs(share - 0.2) < 0.07, share  # 384 draws: sd 0.02, so 3.5 sd
    # bg and fg_bg draw independently
    assert not torch.equal(many_draws["bg"]["brightness"], many_draws["fg_bg"]["brightness"])
    assert not torch.equal(many_draws["bg"]["noise"], many_draws["fg_bg"]["noise"])


@needs_dali
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_noise_hits_flagged_samples_with_the_set_std(rgb, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    cfg = replace(GRAPH, return_params=True, **{**ZERO, "noise_std": 0.05}, noise_prob=0.5)
    flat = collect(build_loader(data, "train", replace(cfg, augment=False)))
    noisy = collect(build_loader(data, "train", cfg))
    seen = {True: 0, False: 0}
    for key, sample in noisy.items():
        for part in ("bg", "fg_bg"):
            residual = denormalize(sample[part], cfg) - denormalize(flat[key][part], cfg)
            flagged = bool(sample["params"][part]["noise"])
            seen[flagged] += 1
            if flagged:
                # N(0, 0.05) in [0, 1] pixel units over 25,600+ pixels; clipping only lowers it
                assert 0.046 < residual.std() < 0.0525, (key, part)
                assert abs(residual.mean()) < 0.003, (key, part)
            else:
                assert torch.equal(sample[part], flat[key][part]), (key, part)
        assert torch.equal(sample["depth"], flat[key]["depth"])
    assert seen[True] and seen[False]


@needs_dali
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_targets_stay_binary_and_in_range_when_augmented(rgb, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    cfg = replace(GRAPH, noise_prob=1.0, return_params=True)
    plain = collect(build_loader(data, "train", replace(cfg, augment=False)))
    untouched = collect(build_loader(data, "train", cfg))
    moved = collect(build_loader(data, "train", replace(cfg, augment_targets=True)))
    for key in plain:
        for part in ("mask", "depth"):
            assert torch.equal(untouched[key][part], plain[key][part]), (key, part)
        assert set(moved[key]["mask"].unique().tolist()) <= {0.0, 1.0}
        depth = moved[key]["depth"]
        assert depth.min() >= 0 and depth.max() <= 1
        assert (depth - plain[key]["depth"]).abs().mean() > 1e-3, key
        assert set(moved[key]["params"]) == {"bg", "fg_bg", "mask", "depth", "sample"}
        assert moved[key]["params"]["depth"]["saturation"] == 1  # targets are single-channel


# -------------------------------------------------------------------------------- determinism


@needs_dali
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_same_seed_epoch_and_ranks_give_the_same_batches(rgb, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    for rank in (0, 1):
        cfg = replace(GRAPH, rank=rank, world_size=2)
        first = as_lists(build_loader(data, "train", cfg), 2)
        assert_same_batches(first, as_lists(build_loader(data, "train", cfg), 2))
        other = as_lists(build_loader(data, "train", cfg), 3)
        assert not all(torch.equal(a["bg"], b["bg"]) for a, b in zip(first, other))


# --------------------------------------------------------------------------- pipeline reuse


@pytest.fixture
def count_builds(monkeypatch):
    """The number of DALI pipelines built since the test started."""
    from pipeline import dali

    monkeypatch.setattr(dali.DaliPipeline, "builds", 0)
    return lambda: dali.DaliPipeline.builds


@needs_dali
@pytest.mark.parametrize("augment_in", ["dali", "torch"])
@pytest.mark.parametrize("last_batch", ["partial", "drop"])
def test_test_split_pipeline_is_built_once_and_reset(
    augment_in, last_batch, tiny_shards_rgb, count_builds
):
    cfg = replace(GRAPH, augment_in=augment_in, last_batch=last_batch, batch_size=6)
    loader = build_loader(tiny_shards_rgb, "test", cfg)
    evaluations = [as_lists(loader, epoch) for epoch in range(3)]
    assert count_builds() == 1
    sizes = [6, 6, 6, 6, 6] + ([2] if last_batch == "partial" else [])
    assert [len(b["key"]) for b in evaluations[2]] == sizes
    fresh = as_lists(build_loader(tiny_shards_rgb, "test", cfg), 2)
    for reused in evaluations:
        assert_same_batches(reused, fresh)  # epoch e of the reused pipeline == a fresh one's


@needs_dali
@pytest.mark.parametrize("augment_in", ["dali", "torch"])
def test_train_pipeline_is_built_once_over_three_epochs(augment_in, tiny_shards, count_builds):
    # Noise off: in the graph its values come from DALI's generator, whose state runs on
    # across epochs (which samples get noise is fixed; see test_graph_and_torch_path_...).
    cfg = replace(GRAPH, augment_in=augment_in, noise_std=0.0)
    train = build_loader(tiny_shards, "train", cfg)
    epochs = [as_lists(train, epoch) for epoch in range(3)]
    assert count_builds() == 1
    for epoch in (0, 2):  # each epoch is what a fresh loader (a restarted run) reads
        fresh = build_loader(tiny_shards, "train", cfg)
        assert_same_batches(epochs[epoch], as_lists(fresh, epoch))
    assert epochs[0][0]["key"] != epochs[1][0]["key"]  # a new order every epoch


@needs_dali
def test_abandoned_epoch_is_drained_not_rebuilt(tiny_shards, count_builds):
    test = build_loader(tiny_shards, "test", GRAPH)
    full = as_lists(test, 0)
    partial = test.epoch(1)
    next(partial)
    partial.close()  # e.g. a benchmark or preview that stops early
    assert_same_batches(as_lists(test, 2), full)
    train = build_loader(tiny_shards, "train", GRAPH)
    half = train.epoch(0)
    first = next(half)
    del half  # abandoned with batches still queued in DALI's prefetch
    again = as_lists(train, 0)
    assert again[0]["key"] == first["key"] and len(again) == 8
    assert count_builds() == 2  # one per loader: the queued batches were drained


@needs_dali
@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_dali_reads_ahead_of_the_batch_in_hand(prefetch, tiny_shards):
    """While the consumer holds batch i, DALI has already asked the feed for the next ones
    (``prefetch`` deep): their decoding overlaps the training step."""
    loader = build_loader(tiny_shards, "train", replace(GRAPH, prefetch=prefetch))
    batches = loader.epoch(0)
    next(batches)
    ahead = len(loader._dali.feed.sent)  # handed to DALI, not yet returned
    assert ahead == prefetch - 1  # depth 1: nothing ahead, the feed waits for the consumer
    rest = list(batches)
    assert len(rest) == 7 and not loader._dali.feed.sent  # all returned by the epoch's end


@needs_dali
def test_each_rank_keeps_its_share_of_the_test_split(tiny_shards):
    keys = []
    for rank in (0, 1):
        loader = build_loader(tiny_shards, "test", replace(GRAPH, rank=rank, world_size=2))
        first = [k for batch in loader.epoch(0) for k in batch["key"]]
        again = [k for batch in loader.epoch(1) for k in batch["key"]]
        assert first == again and len(first) == 16
        keys.append(set(first))
    assert not keys[0] & keys[1]


@needs_dali
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
@pytest.mark.parametrize("augment_targets", [False, True], ids=["inputs", "targets"])
@pytest.mark.parametrize("flip", [False, True], ids=["", "flip"])
@pytest.mark.parametrize("paired", [False, True], ids=["apart", "paired"])
def test_gpu_train_graph_has_few_cpu_operators(rgb, augment_targets, flip, paired):
    """The GPU graph, counted by operator device without a GPU: the feed's outputs are the
    only CPU operators (4 JPEG streams, the parameters and, with flip, the flags), decoding
    is mixed, the rest GPU; the shared noise of paired jitter is one GPU draw."""
    from pipeline import dali
    from pipeline.dali_graph import cpu_operator_count, loader_graph

    cfg = LoaderConfig(
        device="cuda",
        augment_targets=augment_targets,
        flip=flip,
        object_jitter=0.3 * flip,
        paired_jitter=paired,
    )
    sizes = {"bg": (160, 160), "fg_bg": (160, 160), "mask": (160, 160), "depth": (80, 80)}
    for float_out in (True, False):
        spec = dali.graph_spec(cfg, 3 if rgb else 1, sizes, float_out=float_out, augment=True)
        pipe = loader_graph(
            feed=lambda: None, spec=spec, batch_size=512, num_threads=1, device_id=0, seed=0
        )
        counts = cpu_operator_count(pipe)
        assert counts["cpu"] == 4 + int(float_out) * (1 + flip) <= 10, counts
        assert counts["mixed"] == 4, counts  # nvJPEG / hardware decoding
        assert counts.get("gpu", 0) > 0 if float_out else "gpu" not in counts, counts
    cpu_spec = dali.graph_spec(LoaderConfig(), 3 if rgb else 1, sizes, True, augment=True)
    on_cpu = cpu_operator_count(
        loader_graph(feed=lambda: None, spec=cpu_spec, batch_size=8, num_threads=1, device_id=None)
    )
    assert set(on_cpu) == {"cpu"}  # the same graph, all CPU operators without a device


# ---------------------------------------------------------------------------- configuration


def test_augment_in_choices_and_resolution(tiny_shards):
    with pytest.raises(LoaderError, match="augment_in='gpu'"):
        LoaderConfig(augment_in="gpu")
    with pytest.raises(LoaderError, match="augment_in='dali' needs the DALI backend"):
        build_loader(tiny_shards, "train", replace(GRAPH, backend="torch"))
    auto = LoaderConfig()
    assert resolve_augment_in(auto, "dali") == "torch"  # CPU: the fused torch path
    assert resolve_augment_in(replace(auto, device="cuda"), "dali") == "dali"
    assert resolve_augment_in(replace(auto, device="cuda:1"), "torch") == "torch"
    assert resolve_augment_in(replace(auto, augment_in="dali"), "dali") == "dali"
    torch_loader = build_loader(
        tiny_shards, "train", replace(GRAPH, backend="torch", augment_in="auto")
    )
    assert torch_loader.augment_in == "torch"


def test_preview_takes_augment_in(tiny_shards_rgb, tmp_path):
    out = tmp_path / "grid.png"
    bad = run_cli(
        "-m", "pipeline.preview", "--data", str(tiny_shards_rgb), "--out", str(out),
        "--loader", "torch", "--augment-in", "dali",
    )  # fmt: skip
    assert bad.returncode == 1 and not out.exists()
    assert bad.stderr.startswith("error: augment_in='dali' needs the DALI backend")
    assert "Traceback" not in bad.stderr
    if dali_available():
        good = run_cli(
            "-m", "pipeline.preview", "--data", str(tiny_shards_rgb), "--out", str(out),
            "--loader", "dali", "--augment-in", "dali", "--n", "2",
        )  # fmt: skip
        assert good.returncode == 0, good.stderr
        assert '"augment_in": "dali"' in good.stdout and "augment_in='dali'" in good.stdout
        assert out.stat().st_size > 0


def test_default_threads_share_the_cpus_among_local_ranks(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_threads(LoaderConfig()) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_threads(LoaderConfig()) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert resolve_threads(LoaderConfig()) == 1
    assert resolve_threads(LoaderConfig(num_threads=3)) == 3  # explicit values win
    assert resolve_threads(LoaderConfig(num_threads=0)) == 0  # torch: load in the main process
    with pytest.raises(LoaderError, match="num_threads=-1"):
        LoaderConfig(num_threads=-1)


# ------------------------------------------------------------------------------------- GPU


def cuda_cfg(**overrides) -> LoaderConfig:
    return replace(GRAPH, device="cuda", augment_in="auto", **overrides)


@pytest.mark.gpu
@needs_dali
@needs_cuda
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_gpu_mixed_decode_matches_cpu_decode(rgb, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    gpu = build_loader(data, "train", cuda_cfg(augment=False))
    assert gpu.augment_in == "dali"
    on_gpu = collect(gpu)
    on_cpu = collect(build_loader(data, "train", replace(GRAPH, augment=False)))
    assert on_gpu.keys() == on_cpu.keys() and len(on_gpu) == 32
    for key in on_gpu:
        for part in PARTS:
            assert on_gpu[key][part].is_cuda, part
            diff = (on_gpu[key][part].cpu() - on_cpu[key][part]).abs()
            if part == "mask":
                assert diff.mean() < 0.002, key  # a few edge pixels either side of 127
            else:
                # nvJPEG against libjpeg-turbo: a few levels (bg/fg_bg in normalised units)
                scale = GRAPH.std if part in ("bg", "fg_bg") else 1.0
                assert diff.mean() * scale < 3 / 255, (key, part)


@pytest.mark.gpu
@needs_dali
@needs_cuda
@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_gpu_graph_augments_on_the_device(rgb, tiny_shards, tiny_shards_rgb):
    data = tiny_shards_rgb if rgb else tiny_shards
    cfg = cuda_cfg(return_params=True, augment_targets=True)
    loader = build_loader(data, "train", cfg)
    batches = list(loader.epoch(0))
    channels = 3 if rgb else 1
    for batch in batches:
        assert batch["bg"].shape[1:] == (channels, 160, 160)
        for part in PARTS:
            assert batch[part].is_cuda and batch[part].dtype == torch.float32, part
            assert batch[part].is_contiguous(memory_format=torch.channels_last), part
        assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
        assert batch["depth"].min() >= 0 and batch["depth"].max() <= 1
        bg = denormalize(batch["bg"], cfg)
        assert bg.min() >= 0 and bg.max() <= 1
        assert set(batch["params"]) == {"bg", "fg_bg", "mask", "depth"}
    # zero strength is the identity on the device too, and close to the CPU graph's
    plain = collect(build_loader(data, "train", cuda_cfg(augment=False)))
    zero = collect(build_loader(data, "train", cuda_cfg(augment_targets=True, **ZERO)))
    cpu_zero = collect(build_loader(data, "train", replace(GRAPH, augment_targets=True, **ZERO)))
    for key in plain:
        for part in PARTS:
            assert torch.equal(zero[key][part], plain[key][part]), (key, part)
        diff = denormalize(zero[key]["bg"].cpu(), cfg) - denormalize(cpu_zero[key]["bg"], cfg)
        assert diff.abs().mean() < 3 / 255, key


@pytest.mark.gpu
@needs_dali
@needs_cuda
def test_gpu_test_pipeline_is_reused_and_prefetches(tiny_shards_rgb, count_builds):
    loader = build_loader(tiny_shards_rgb, "test", cuda_cfg())
    first, second = as_lists(loader, 0), as_lists(loader, 1)
    assert_same_batches(first, second)
    assert count_builds() == 1
    assert all(b["bg"].is_cuda for b in first)
    # a train pipeline of the same loader config overlaps too, and ends up on the device
    train = next(iter(build_loader(tiny_shards_rgb, "train", cuda_cfg()).epoch(0)))
    assert train["bg"].is_cuda and train["bg"].is_contiguous(memory_format=torch.channels_last)
