"""The UNet, its loss, the summary CLI and the step benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from model import LOSS_WEIGHTS, LossConfig, MaskDepthLoss, UNet, UNetConfig, count_parameters
from model.losses import aux_depth_loss, depth_gradient_l1
from model.summary import _thop_layer_macs, summarize
from training.checkpoint import saved_model_config

ROOT = Path(__file__).resolve().parent.parent
PARAM_BUDGET = 750_000


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` from the repository root, as a user would."""
    # PASSIVE unless the caller chose: spinning OpenMP threads crawl on a shared 2-core box.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def random_inputs(cfg: UNetConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_channels, cfg.mask_size, cfg.mask_size)
    bg = torch.rand(shape, generator=generator)
    fg_bg = torch.rand(shape, generator=generator)
    return UNet.input_from(bg, fg_bg)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shapes_and_ranges(in_channels):
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=in_channels)
    model = UNet(cfg)
    x = random_inputs(cfg, batch=2)
    assert x.shape == (2, 2 * in_channels, 160, 160)
    mask_logits, depth = model(x)
    assert mask_logits.shape == (2, 1, 160, 160)
    assert depth.shape == (2, 1, 80, 80)
    assert torch.isfinite(mask_logits).all() and torch.isfinite(depth).all()
    assert depth.min() >= 0 and depth.max() <= 1
    # Logits, not probabilities: a fresh net gives some negative values.
    assert mask_logits.min() < 0


@pytest.mark.parametrize(
    ("depth_size", "depth_shape"),
    [(160, (1, 1, 160, 160)), (40, (1, 1, 40, 40)), (10, (1, 1, 10, 10))],
)
def test_depth_head_can_branch_off_any_level(depth_size, depth_shape):
    # 10 is the bottleneck level, where no decoder stage runs.
    model = UNet(UNetConfig(depth_size=depth_size)).eval()
    mask_logits, depth = model(random_inputs(model.cfg, batch=1))
    assert mask_logits.shape == (1, 1, 160, 160)
    assert depth.shape == depth_shape


# The default recipe's model (add skips, context, aux heads), the reference's plain UNet, and
# each of the default's features on its own.
REFERENCE_MODEL = {"diff_input": False, "skip": "concat", "context": False, "aux_depth": False}
MODEL_VARIANTS = [
    {},
    REFERENCE_MODEL,
    {**REFERENCE_MODEL, "skip": "add"},
    {**REFERENCE_MODEL, "context": True},
    {**REFERENCE_MODEL, "aux_depth": True},
]


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_every_parameter_gets_a_gradient(variant):
    torch.manual_seed(0)
    model = UNet(UNetConfig(**variant))
    x = random_inputs(model.cfg, batch=2)
    mask_logits, depth, *aux = model(x, aux=True) if model.cfg.aux_depth else model(x)
    (mask_logits.mean() + depth.mean() + sum(a.mean() for a in (aux or [()])[0])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"all-zero gradient for {zero}"


def test_diff_input_feeds_the_difference_and_keeps_the_interface():
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=1, widths=(4, 8, 16), diff_input=True)
    model = UNet(cfg).eval()
    assert cfg.input_channels == 2 and cfg.stem_channels == 4
    stem = model.encoder[0][0]
    assert stem.in_channels == 4
    x = random_inputs(cfg, batch=2)
    seen = {}
    stem.register_forward_hook(lambda module, args, out: seen.update(x=args[0]))
    mask_logits, depth = model(x)
    assert mask_logits.shape == (2, 1, 160, 160) and depth.shape == (2, 1, 80, 80)
    bg, fg_bg = x[:, :1], x[:, 1:]
    expected = torch.cat([bg, fg_bg, fg_bg - bg, (fg_bg - bg).abs()], dim=1)
    torch.testing.assert_close(seen["x"], expected)
    # The default recipe's model has it; old checkpoints have no diff_input field: they load
    # as the 2C-input model they were.
    assert UNetConfig().diff_input is True
    old = {"model_config": {"in_channels": 1, "widths": [4, 8, 16]}}
    assert UNetConfig(**saved_model_config(old)).diff_input is False


def test_add_skips_convolve_only_the_skips_channels_at_full_resolution():
    concat = UNet(UNetConfig(in_channels=1, widths=(4, 8, 16), skip="concat"))
    add = UNet(UNetConfig(in_channels=1, widths=(4, 8, 16), skip="add"))
    assert concat.decoder[0].conv[0][0].in_channels == 4 + 8  # upsampled level + skip
    assert add.decoder[0].conv[0][0].in_channels == 4  # the level mapped to 4, plus the skip
    # The 1x1 map runs at the low resolution: 8 -> 4 channels on the 80x80 level.
    assert add.decoder[0].reduce[0].in_channels == 8
    x = random_inputs(add.cfg, batch=2)
    seen = {}
    add.decoder[0].conv.register_forward_hook(lambda module, args, out: seen.update(x=args[0]))
    add.decoder[0].register_forward_hook(lambda module, args, out: seen.update(args=args))
    add.eval()(x)
    low, skip = seen["args"]
    up = add.decoder[0].upsample(add.decoder[0].reduce(low))
    torch.testing.assert_close(seen["x"], up + skip)


def test_context_blocks_add_one_vector_per_image_and_one_per_row():
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=1, widths=(4, 8, 16), context=True)).eval()
    x = torch.randn(2, 16, 12, 10)  # the bottleneck's 16 channels
    # Global context: the same vector at every position, different per image.
    added = model.global_context(x) - x
    assert added.shape == x.shape
    torch.testing.assert_close(added, added[:, :, :1, :1].expand_as(added))
    assert not torch.allclose(added[0], added[1])
    # Row context: the same across a row's columns, different between rows.
    x = torch.randn(2, 8, 12, 10)  # the depth level's 8 channels
    added = model.row_context(x) - x
    torch.testing.assert_close(added, added[..., :1].expand_as(added))
    assert not torch.allclose(added[:, :, 0], added[:, :, 6])
    # Without context there are no such modules, so plain checkpoints keep their keys.
    plain = UNet(UNetConfig(in_channels=1, widths=(4, 8, 16), context=False))
    assert not any("context" in k for k in plain.state_dict())
    assert model.global_context is not None and model.row_context is not None


@pytest.mark.parametrize(
    ("widths", "depth_size", "levels", "sizes"),
    [
        ((16, 32, 64, 192, 384), 80, (3, 2), [20, 40]),  # the default: 20x20 and 40x40
        ((8, 16, 32, 64), 80, (2,), [40]),  # make demo's widths
        ((4, 8, 16), 80, (), []),  # the depth head sits on the level below the bottleneck
        ((4, 8, 16), 160, (1,), [80]),
    ],
)
def test_aux_depth_heads_sit_between_the_bottleneck_and_the_depth_head(
    widths, depth_size, levels, sizes
):
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=1, widths=widths, depth_size=depth_size, aux_depth=True)
    assert cfg.aux_levels == levels
    model = UNet(cfg)
    x = random_inputs(cfg, batch=2)
    mask_logits, depth, aux = model(x, aux=True)
    assert [a.shape[-2:] for a in aux] == [(s, s) for s in sizes]
    assert all(a.shape[:2] == (2, 1) and a.min() >= 0 and a.max() <= 1 for a in aux)
    # Without aux the same two outputs: the heads change nothing at inference.
    plain_logits, plain_depth = model(x)
    torch.testing.assert_close(plain_logits, mask_logits)
    torch.testing.assert_close(plain_depth, depth)
    if aux:  # every head is trained by a loss on its map
        (sum(a.mean() for a in aux)).backward()
        assert all(p.grad.abs().sum() > 0 for p in model.aux_heads.parameters())


def test_a_model_without_aux_heads_has_no_aux_keys_and_refuses_aux():
    model = UNet(UNetConfig(in_channels=1, widths=(4, 8, 16, 32), aux_depth=False))
    assert UNetConfig(aux_depth=False).aux_levels == ()
    assert UNetConfig().aux_levels == (3, 2)  # the default recipe weighs the aux heads
    assert not any(k.startswith("aux_heads") for k in model.state_dict())
    with pytest.raises(ValueError, match=r"aux=True needs .*aux_depth=True"):
        model(random_inputs(model.cfg, batch=1), aux=True)


def test_aux_depth_loss_is_zero_for_the_pooled_target_and_grows_with_a_wrong_horizon():
    room = torch.zeros(2, 1, 80, 80)
    room[..., :30, :] = 1.0  # the far wall
    room[..., 30:, :] = torch.linspace(0.6, 0.0, 50)[:, None]  # the floor
    exact = [F.avg_pool2d(room, 4), F.avg_pool2d(room, 2)]  # 20x20, 40x40
    assert aux_depth_loss(exact, room, grad_weight=2.0) < 1e-5
    moved = [torch.roll(a, 3, dims=-2) for a in exact]  # the floor starts 3 cells lower
    assert aux_depth_loss(moved, room, grad_weight=2.0) > 0.1
    assert aux_depth_loss([], room, grad_weight=2.0) == 0
    # Its weight adds it to the total; the term is logged (0 without maps) whatever the weight.
    mask = torch.zeros(2, 1, 160, 160)
    logits = torch.full_like(mask, -30.0)
    depth = torch.rand(2, 1, 80, 80)
    weighted = MaskDepthLoss(LossConfig(depth_aux_weight=0.5))
    without = weighted(logits, depth, mask, room)
    assert without["depth_aux"] == 0
    with_aux = weighted(logits, depth, mask, room, moved)
    torch.testing.assert_close(with_aux["depth_aux"], aux_depth_loss(moved, room, 2.0))
    # The optimizer minimises the objective; "loss" adds up the terms evaluation has too.
    torch.testing.assert_close(with_aux["objective"], without["loss"] + 0.5 * with_aux["depth_aux"])
    torch.testing.assert_close(with_aux["loss"], without["loss"])


def test_unknown_skip_is_refused():
    with pytest.raises(ValueError, match="skip='sum' must be one of concat, add"):
        UNetConfig(skip="sum")


@pytest.mark.parametrize("variant", [{}, REFERENCE_MODEL])
def test_parameter_budget(variant):
    model = UNet(UNetConfig(in_channels=3, **variant))
    params = count_parameters(model)
    assert params <= PARAM_BUDGET
    # Each tensor once: the same number as walking the unique parameter set by hand.
    assert params == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert count_parameters(model, trainable_only=True) == params


def test_count_parameters_counts_shared_weights_once():
    shared = nn.Linear(10, 10)
    tied = nn.Sequential(shared, shared)
    assert count_parameters(tied) == 110


def test_input_from_concatenates_bg_then_fg_bg():
    bg = torch.zeros(2, 3, 8, 8)
    fg_bg = torch.ones(2, 3, 8, 8)
    x = UNet.input_from(bg, fg_bg)
    assert x.shape == (2, 6, 8, 8)
    assert x[:, :3].sum() == 0 and x[:, 3:].mean() == 1
    with pytest.raises(ValueError, match="same shape"):
        UNet.input_from(bg, torch.ones(2, 1, 8, 8))


def test_forward_rejects_wrong_input():
    model = UNet(UNetConfig(in_channels=3))
    with pytest.raises(ValueError, match=r"must be \(B, 6, H, W\)"):
        model(torch.rand(1, 2, 160, 160))
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.rand(1, 6, 100, 100))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": 0}, "in_channels=0"),
        ({"widths": (16,)}, "at least two"),
        ({"mask_size": 100}, "divisible by 16"),
        ({"depth_size": 60}, "depth_size=60"),
        ({"depth_size": 5}, "depth_size=5"),
        ({"depth_size": 320}, "depth_size=320"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        UNetConfig().in_channels = 1  # type: ignore[misc]


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    nchw = UNet(UNetConfig(channels_last=False)).eval()
    nhwc = UNet(UNetConfig(channels_last=True)).eval()
    nhwc.load_state_dict(nchw.state_dict())
    assert nhwc.encoder[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = random_inputs(nchw.cfg, batch=2)
    with torch.no_grad():
        expected = nchw(x)
        got = nhwc(x.contiguous(memory_format=torch.channels_last))
        got_from_nchw_input = nhwc(x)
    for e, g, h in zip(expected, got, got_from_nchw_input, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h, g)


def test_cpu_bf16_autocast_forward_and_loss():
    torch.manual_seed(0)
    model = UNet(UNetConfig(aux_depth=False))
    x = random_inputs(model.cfg, batch=2)
    with torch.no_grad():
        ref_logits, ref_depth = model.eval()(x)
    model.train()
    loss_fn = MaskDepthLoss()
    mask = (torch.rand(2, 1, 160, 160) > 0.5).float()
    depth_true = torch.rand(2, 1, 80, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_logits, depth = model(x)
        losses = loss_fn(mask_logits, depth, mask, depth_true)
    assert mask_logits.dtype == torch.bfloat16
    assert torch.isfinite(mask_logits.float()).all() and torch.isfinite(depth.float()).all()
    # SSIM and BCE ran in fp32 despite autocast.
    assert all(v.dtype == torch.float32 for v in losses.values())
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits, bf16_depth = model.eval()(x)
    # bf16 keeps ~3 significant digits: close to fp32, not equal.
    assert (bf16_depth.float() - ref_depth).abs().max() < 0.05
    assert (bf16_logits.float() - ref_logits).abs().mean() < 0.1


def test_loss_terms_and_weights():
    torch.manual_seed(0)
    mask_logits = torch.randn(3, 1, 160, 160)
    mask = (torch.rand(3, 1, 160, 160) > 0.5).float()
    depth_pred = torch.rand(3, 1, 80, 80)
    depth_true = torch.rand(3, 1, 80, 80)
    losses = MaskDepthLoss(LossConfig())(mask_logits, depth_pred, mask, depth_true)
    assert set(losses) == {
        "objective",
        "loss",
        "mask_bce",
        "mask_dice_loss",
        "depth_ssim_loss",
        "depth_l1",
        "depth_grad",
        "depth_aux",
    }
    bce = F.binary_cross_entropy_with_logits(mask_logits, mask)
    ssim_loss = 1 - ssim(depth_pred, depth_true, data_range=1.0)
    prob = torch.sigmoid(mask_logits)
    dice_loss = 1 - (2 * (prob * mask).sum() + 1) / (prob.sum() + mask.sum() + 1)
    l1 = (depth_pred - depth_true).abs().mean()
    dx = lambda d: d[..., :, 1:] - d[..., :, :-1]  # noqa: E731
    dy = lambda d: d[..., 1:, :] - d[..., :-1, :]  # noqa: E731
    grad = (dx(depth_pred) - dx(depth_true)).abs().mean()
    grad = grad + (dy(depth_pred) - dy(depth_true)).abs().mean()
    torch.testing.assert_close(losses["mask_bce"], bce)
    torch.testing.assert_close(losses["depth_ssim_loss"], ssim_loss)
    torch.testing.assert_close(losses["mask_dice_loss"], dice_loss)
    torch.testing.assert_close(losses["depth_l1"], l1)
    torch.testing.assert_close(losses["depth_grad"], grad)
    # The defaults are the default recipe's: the Dice and L1 terms are logged, not added.
    torch.testing.assert_close(losses["loss"], 4 * bce + ssim_loss + 2 * grad)
    torch.testing.assert_close(losses["objective"], losses["loss"])  # no aux maps given
    depth_only = MaskDepthLoss(LossConfig(mask_weight=0.0, depth_weight=3.0, depth_grad_weight=0))
    total = depth_only(mask_logits, depth_pred, mask, depth_true)["loss"]
    torch.testing.assert_close(total, 3 * ssim_loss)
    every = LossConfig(1.0, dice_weight=2.0, depth_weight=3.0, depth_l1_weight=4.0,
                       depth_grad_weight=5.0)  # fmt: skip
    total = MaskDepthLoss(every)(mask_logits, depth_pred, mask, depth_true)["loss"]
    expected = bce + 2 * dice_loss + 3 * ssim_loss + 4 * l1 + 5 * grad
    torch.testing.assert_close(total, expected)


def test_dice_loss_is_zero_for_a_confident_perfect_mask():
    mask = torch.zeros(2, 1, 160, 160)
    mask[:, :, 40:90, 50:100] = 1
    logits = mask * 60 - 30
    losses = MaskDepthLoss()(logits, torch.zeros(2, 1, 80, 80), mask, torch.zeros(2, 1, 80, 80))
    assert losses["mask_dice_loss"] < 1e-6
    wrong = MaskDepthLoss()(-logits, torch.zeros(2, 1, 80, 80), mask, torch.zeros(2, 1, 80, 80))
    assert wrong["mask_dice_loss"] > 0.99


def test_loss_of_a_perfect_depth_is_zero():
    depth = torch.rand(2, 1, 80, 80)
    mask = torch.zeros(2, 1, 160, 160)
    losses = MaskDepthLoss()(torch.full_like(mask, -30.0), depth, mask, depth)
    assert losses["depth_ssim_loss"].abs() < 1e-5
    assert losses["depth_grad"] == 0
    # The gradient term sees a shift that L1 of a flat offset would not: an edge in the wrong row.
    step = torch.zeros(1, 1, 80, 80)
    step[..., 40:, :] = 1.0
    shifted = torch.roll(step, 2, dims=-2)
    offset = (step + 0.05).clamp(max=1.0)
    assert depth_gradient_l1(shifted, step) > 10 * depth_gradient_l1(offset, step)
    assert losses["mask_bce"] < 1e-10


def test_loss_rejects_mismatched_shapes():
    loss_fn = MaskDepthLoss()
    with pytest.raises(ValueError, match="depth_size"):
        loss_fn(
            torch.zeros(1, 1, 160, 160),
            torch.zeros(1, 1, 80, 80),
            torch.zeros(1, 1, 160, 160),
            torch.zeros(1, 1, 160, 160),
        )
    with pytest.raises(ValueError, match="mask_size"):
        loss_fn(
            torch.zeros(1, 1, 160, 160),
            torch.zeros(1, 1, 80, 80),
            torch.zeros(1, 1, 80, 80),
            torch.zeros(1, 1, 80, 80),
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask_weight": -1.0}, "must be >= 0"),
        ({"dice_weight": -0.5}, "dice_weight.*must be >= 0"),
        (dict.fromkeys(LOSS_WEIGHTS, 0.0), "all 0"),
    ],
)
def test_loss_config_rejects_bad_weights(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread, then restore the previous count."""
    # With 2 threads on 2 cores shared with other processes, OpenMP's spin-waiting made this
    # test take 45 s instead of 4 s; one thread is fast whether or not the box is busy.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_overfits_one_small_batch(one_thread):
    # A smooth depth ramp and a disc: learnable targets, unlike random noise.
    torch.manual_seed(0)
    cfg = UNetConfig()
    model = UNet(cfg)
    loss_fn = MaskDepthLoss()
    x = random_inputs(cfg, batch=4, seed=1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 160), torch.linspace(-1, 1, 160), indexing="ij")
    offsets = torch.linspace(-0.4, 0.4, 4)
    mask = torch.stack([((xx - o) ** 2 + yy**2 < 0.3).float() for o in offsets]).unsqueeze(1)
    ramp = torch.linspace(0, 1, 80)
    depth = torch.stack([ramp.outer(torch.ones(80)) * (0.5 + o) for o in offsets]).unsqueeze(1)
    # With lr 1e-2 the loss passes 0.7x by step 5 and is ~0.45x at step 10 (2.59 -> 1.14).
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(10):
        mask_logits, depth_pred = model(x)
        loss = loss_fn(mask_logits, depth_pred, mask, depth)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0], history


def test_summarize_counts_match_the_model():
    cfg = UNetConfig()
    summary = summarize(cfg)
    model = UNet(cfg)
    assert summary["params"] == count_parameters(model) <= PARAM_BUDGET
    assert summary["input"] == [1, 6, 160, 160]
    assert summary["outputs"] == {"mask": [1, 1, 160, 160], "depth": [1, 1, 80, 80]}
    assert sum(b["params"] for b in summary["blocks"]) == summary["params"]
    assert sum(b["macs"] for b in summary["blocks"]) == summary["macs"]
    # The stem's dense 3x3 conv alone: 160*160 outputs x 16 channels x 6*3*3 MACs.
    assert summary["blocks"][0]["macs"] > 160 * 160 * 16 * 6 * 9
    assert 0 < summary["macs"] < 900_000_000


def test_thop_leaves_the_model_untouched():
    model = UNet(UNetConfig())
    keys = set(model.state_dict())
    macs, _ = _thop_layer_macs(model, torch.zeros(1, 6, 160, 160))
    assert macs > 0
    assert set(model.state_dict()) == keys
    assert not any(hasattr(m, "total_ops") for m in model.modules())
    assert model.training


def test_summary_cli_json():
    result = run_module("model.summary", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"params", "macs", "input", "outputs"} <= set(summary)
    # the default recipe's model, aux heads in its params (not in its inference MACs)
    assert summary["model"] == UNetConfig().describe() and summary["config"]["aux_depth"]
    assert 0 < summary["aux_params"] < summary["params"]
    assert isinstance(summary["params"], int) and 0 < summary["params"] <= PARAM_BUDGET
    assert isinstance(summary["macs"], int) and summary["macs"] > 0
    assert summary["input"] == [1, 6, 160, 160]
    assert summary["outputs"] == {"mask": [1, 1, 160, 160], "depth": [1, 1, 80, 80]}

    gray = json.loads(run_module("model.summary", "--json", "--in-channels", "1").stdout)
    assert gray["input"] == [1, 2, 160, 160]
    assert gray["params"] < summary["params"]


def test_summary_cli_table_and_errors():
    table = run_module("model.summary")
    assert table.returncode == 0, table.stderr
    assert "decoder.0" in table.stdout and "MACs per sample" in table.stdout
    assert table.stdout.startswith(f"model   {UNetConfig().describe()}\n")
    bad = run_module("model.summary", "--in-channels", "0")
    assert bad.returncode == 2
    assert "in_channels=0" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    args = ["benchmarks.model_step", "--batch-size", "2", "--steps", "1", "--warmup", "1"]
    result = run_module(*args, "--no-compile", "--json", str(out))
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    assert {"cores", "torch", "device_name", "date", "omp_wait_policy"} <= set(payload["machine"])
    layouts = {row["layout"] for row in payload["results"]}
    assert layouts == {"contiguous", "channels_last"}
    assert all(row["samples_per_s"] > 0 and row["compile"] is False for row in payload["results"])
    assert "channels_last" in result.stdout and "samples/s" in result.stdout
    # A second run must not clobber the first without --overwrite.
    again = run_module(*args, "--no-compile", "--json", str(out))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_torch_compile_matches_eager():
    # About two minutes on 2 CPU cores, mostly Inductor compiling the backward graph.
    torch.manual_seed(0)
    model = UNet(UNetConfig())
    compiled = torch.compile(model)
    x = random_inputs(model.cfg, batch=2)
    eager_out = model(x)
    compiled_out = compiled(x)
    for e, c in zip(eager_out, compiled_out, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-3)
    (compiled_out[0].mean() + compiled_out[1].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())
