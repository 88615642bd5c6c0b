"""The training step (bf16 on CUDA) and StepTimer's data/compute split (host clock, CUDA events)."""

from __future__ import annotations

import pytest
import torch

from training import step as step_module
from training.distributed import Runtime
from training.logger import RateWindow
from training.step import StepTimer

WAIT_S, WORK_S, STEPS = 0.03, 0.01, 6


class FakeClock:
    """The host clock the timer reads, advanced only by the test: exact, whatever the load."""

    now = 0.0

    def __call__(self) -> float:
        return FakeClock.now


def slow_batches(n: int):
    for i in range(n):
        FakeClock.now += WAIT_S  # the loader is the bottleneck
        yield {"i": i}


def run_steps(timer: StepTimer, n: int) -> None:
    batches = slow_batches(n)
    while timer.next_batch(batches) is not None:
        FakeClock.now += WORK_S
        timer.step_done(samples=4)


def test_cpu_split_follows_the_host_clock():
    timer = StepTimer(Runtime(device=torch.device("cpu")), clock=FakeClock())
    run_steps(timer, STEPS)
    assert timer.samples == 4 * STEPS
    assert timer.data_s == pytest.approx(STEPS * WAIT_S)
    assert timer.train_s == pytest.approx(STEPS * WORK_S)


class HostEvent:
    """A stand-in for torch.cuda.Event that records the host clock, and counts syncs."""

    syncs = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.t = None

    def record(self) -> None:
        self.t = FakeClock.now  # a GPU that computes exactly as long as the host says

    def synchronize(self) -> None:
        HostEvent.syncs += 1

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) * 1000.0  # milliseconds, as CUDA events report


def test_cuda_split_comes_from_events_read_only_when_asked(monkeypatch):
    monkeypatch.setattr(step_module.torch.cuda, "Event", HostEvent)
    HostEvent.syncs = 0
    timer = StepTimer(Runtime(device=torch.device("cuda")), clock=FakeClock())
    run_steps(timer, STEPS)
    assert HostEvent.syncs == 0  # no step waited for the device
    assert timer.data_s == pytest.approx(STEPS * WAIT_S)  # first wait + the GPU's idle gaps
    assert timer.train_s == pytest.approx(STEPS * WORK_S)
    assert HostEvent.syncs == 1  # one sync to read the figures, then nothing pending
    rate, wait = RateWindow(timer).read()
    assert HostEvent.syncs == 1
    assert wait == pytest.approx(WAIT_S / (WAIT_S + WORK_S))
    assert rate == pytest.approx(4 / (WAIT_S + WORK_S))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_events_count_gpu_work_as_compute():
    rt = Runtime(device=torch.device("cuda"))
    timer = StepTimer(rt)
    a = torch.randn(4096, 4096, device="cuda")
    batches = iter([{"i": i} for i in range(5)])
    while timer.next_batch(batches) is not None:
        for _ in range(10):
            a = (a @ a).clamp_(-1, 1)  # queued GPU work, far longer than the host's part
        timer.step_done(samples=1)
    assert timer.train_s > 0.001 and timer.train_s > timer.data_s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_train_step_on_cuda_learns_in_channels_last():
    from model import LossConfig, MaskDepthLoss, UNet, UNetConfig
    from training.step import forward_loss, train_step

    torch.manual_seed(0)
    rt = Runtime(device=torch.device("cuda"), amp=True, memory_format=torch.channels_last)
    model = UNet(UNetConfig(in_channels=1)).to(rt.device, memory_format=rt.memory_format)
    loss_fn = MaskDepthLoss(LossConfig()).to(rt.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    mask = (torch.rand(8, 1, 160, 160, device="cuda") > 0.5).float()
    batch = {
        "bg": torch.randn(8, 1, 160, 160, device="cuda"),
        "fg_bg": torch.randn(8, 1, 160, 160, device="cuda") + mask,
        "mask": mask,
        "depth": torch.rand(8, 1, 80, 80, device="cuda"),
    }
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    dtypes = []
    conv.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    before = forward_loss(model, loss_fn, batch, rt).losses["loss"].item()
    assert dtypes == [torch.bfloat16]  # autocast ran the convolutions in bf16
    for _ in range(20):
        out = train_step(model, loss_fn, optimizer, batch, rt)
    assert out.mask_logits.dtype == torch.float32  # the loss runs in float32
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert out.losses["loss"].item() < before


def test_forward_loss_adds_the_aux_depth_maps_in_training_only():
    from model import LossConfig, MaskDepthLoss, UNet, UNetConfig
    from training.step import forward_loss

    torch.manual_seed(0)
    rt = Runtime(device=torch.device("cpu"), amp=False, memory_format=torch.channels_last)
    model = UNet(UNetConfig(in_channels=1, widths=(4, 8, 16, 32), aux_depth=True))
    loss_fn = MaskDepthLoss(LossConfig(depth_aux_weight=0.5))
    batch = {
        "bg": torch.randn(2, 1, 160, 160),
        "fg_bg": torch.randn(2, 1, 160, 160),
        "mask": (torch.rand(2, 1, 160, 160) > 0.5).float(),
        "depth": torch.rand(2, 1, 80, 80),
    }
    trained = forward_loss(model.train(), loss_fn, batch, rt).losses
    assert trained["depth_aux"] > 0
    c = loss_fn.cfg
    weights = {"mask_bce": c.mask_weight, "mask_dice_loss": c.dice_weight,
               "depth_ssim_loss": c.depth_weight, "depth_l1": c.depth_l1_weight,
               "depth_grad": c.depth_grad_weight}  # fmt: skip
    rest = sum(w * trained[k] for k, w in weights.items())
    torch.testing.assert_close(trained["objective"], rest + 0.5 * trained["depth_aux"])
    torch.testing.assert_close(trained["loss"], rest)  # the terms the test loss has too
    evaluated = forward_loss(model.eval(), loss_fn, batch, rt).losses
    assert evaluated["depth_aux"] == 0  # the test loss is the model's two outputs only
    torch.testing.assert_close(evaluated["objective"], evaluated["loss"])
