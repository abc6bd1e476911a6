"""The device-resident data path and the step loop's host syncs, on the CPU with CIFAR-format test data.

The loader in order and after a mid-epoch skip; a run with ``--device-data`` that resumes
(mid-epoch and at an epoch's end) to the same metrics and weights as an uninterrupted
one; a count of the step loop's host reads (``.item()``, ``.tolist()``, ``.cpu()``, ...);
the speed switches' resolution. The GPU-only checks (the switches on, CUDA's sync
debug mode) carry the ``cuda`` marker.
"""
import json
import os
import signal
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import requires_cuda, tolerance
from test_train import TINY, assert_same_state, config, load, make_cifar100_folder

from lpjepa import train
from lpjepa.training import loop, runlog
from lpjepa.training.data import EpochSampler, load_splits
from lpjepa.training.device_data import DeviceTwoViewLoader, device_images, holds_images_in_memory
from lpjepa.training.gpu_augment import BatchAugment
from lpjepa.training.speed import SpeedSettings, prepare_model

PACKAGE_DIR = os.path.dirname(os.path.abspath(loop.__file__)).rsplit(os.sep, 1)[0]


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    return make_cifar100_folder(str(tmp_path_factory.mktemp("cifar")))


def device_args(data, out, *extra):
    """A tiny --device-data run; its batches are made in one worker process (the CPU's way), unless extra says otherwise."""
    return ["--data-dir", data, "--skip-data-check", "--no-download", "--out", str(out), *TINY, "--device-data",
            "--num-workers", "1", *extra]


# ----------------------------------------------------------------------------- the loader


def test_loader_follows_the_sampler_and_resumes_mid_epoch(cifar_folder):
    train_set, _ = load_splits("cifar100", cifar_folder, skip_data_check=True)
    assert holds_images_in_memory(train_set)
    images, labels = device_images(train_set, torch.device("cpu"))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[3].permute(1, 2, 0), torch.from_numpy(train_set.data[3]))
    sampler = EpochSampler(train_set, seed=5)
    loader = DeviceTwoViewLoader(images, labels, sampler, 4, BatchAugment("paper", 16, "cifar100"), seed=5)
    sampler.set_epoch(2)
    order = [i for i, _ in sampler]
    full = list(loader)
    assert len(full) == 4
    for b, (x1, x2, y) in enumerate(full):
        assert x1.shape == x2.shape == (4, 3, 16, 16) and x1.dtype == torch.float32
        assert y.tolist() == [train_set.targets[i] for i in order[4 * b : 4 * b + 4]]
        assert not torch.equal(x1, x2)  # two different views of the same images
    sampler.set_epoch(2, skip=8)
    tail = list(loader)
    assert len(tail) == 2
    for (a1, a2, ay), (b1, b2, by) in zip(full[2:], tail):
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(ay, by)
    sampler.set_epoch(3)
    assert not torch.equal(next(iter(loader))[0], full[0][0])


def test_worker_processes_make_the_same_batches(cifar_folder):
    train_set, _ = load_splits("cifar100", cifar_folder, skip_data_check=True)
    images, labels = device_images(train_set, torch.device("cpu"))
    batches = {}
    for workers in (0, 2):
        sampler = EpochSampler(train_set, seed=1)
        loader = DeviceTwoViewLoader(images, labels, sampler, 4, BatchAugment("seed", 32, "cifar100"), seed=1,
                                     num_workers=workers)
        assert (loader.workers is None) == (workers == 0)
        batches[workers] = []
        for epoch, skip in ((0, 0), (1, 4)):
            sampler.set_epoch(epoch, skip=skip)
            batches[workers] += list(loader)
    assert len(batches[0]) == len(batches[2]) == 4 + 3
    atol, rtol = tolerance(torch.float32)  # one thread in a worker, the process's threads here: sums may round apart
    for (a1, a2, ay), (b1, b2, by) in zip(batches[0], batches[2]):
        torch.testing.assert_close(b1, a1, atol=atol, rtol=rtol)
        torch.testing.assert_close(b2, a2, atol=atol, rtol=rtol)
        assert torch.equal(ay, by)


# ----------------------------------------------------------------------------- runs and resumes


@pytest.fixture(scope="module")
def straight_device_run(cifar_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("device_straight")
    train.main(device_args(cifar_folder, out, "--epochs", "2", "--log-every", "3"))
    return out


def metrics(out):
    return runlog.MetricsCSV(out / "metrics.csv", runlog.COLUMNS).read()


def assert_same_metrics(a, b):
    keys = ("loss", "invariance", "regularizer", "train_zero_fraction", "probe_loss", "probe_backbone_top1", "knn_top1",
            "val_zero_fraction")
    assert [{k: r[k] for k in keys} for r in metrics(a)] == [{k: r[k] for k in keys} for r in metrics(b)]


def test_device_data_run_records_its_path(straight_device_run):
    cfg = json.load(open(straight_device_run / "config.json"))
    assert cfg["device_data_active"] is True and cfg["amp_active"] is False and cfg["compile_active"] is False
    assert len(metrics(straight_device_run)) == 2


def test_device_data_resumes_exactly_after_an_epoch(straight_device_run, cifar_folder, tmp_path):
    out = tmp_path / "resumed"
    train.main(device_args(cifar_folder, out, "--epochs", "1", "--log-every", "3"))
    train.main(["--resume", str(out), "--epochs", "2", "--no-progress"])
    assert_same_state(load(straight_device_run / "checkpoints" / "last.pt"), load(out / "checkpoints" / "last.pt"))
    assert_same_metrics(straight_device_run, out)


def test_device_data_resumes_exactly_mid_epoch(straight_device_run, cifar_folder, tmp_path):
    out = tmp_path / "interrupted"
    cfg, _ = config(device_args(cifar_folder, out, "--epochs", "2", "--log-every", "3"))

    def terminate(epoch, batch):
        if (epoch, batch) == (1, 1):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit):
        loop.train(cfg, on_step=terminate)
    state = load(out / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batches_done"]) == (1, 1)
    train.main(["--resume", str(out), "--no-progress"])
    assert_same_state(load(straight_device_run / "checkpoints" / "last.pt"), load(out / "checkpoints" / "last.pt"))
    assert_same_metrics(straight_device_run, out)


# ----------------------------------------------------------------------------- host syncs of the step loop

# Tensor methods that copy a value to the host, and so make it wait for the device. (`.numpy()`
# raises on a CUDA tensor, so it never syncs silently; the CPU loss backend uses it on CPU tensors.)
HOST_READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__format__")


def test_step_loop_reads_the_device_only_when_due(cifar_folder, tmp_path, patch):
    """Counts host reads made by the package's own code during train_epoch, per step: only steps where sync_due holds read."""
    # No workers: the batches are made in this process, as on CUDA, and their reads count too.
    cfg, _ = config(device_args(cifar_folder, tmp_path / "run", "--epochs", "2", "--log-every", "3", "--num-workers", "0"))
    reads, due_steps, inside = [], set(), {}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "trainer" in inside and os.path.abspath(caller).startswith(PACKAGE_DIR):
                reads.append((inside["trainer"].state.global_step, name, os.path.basename(caller)))
            return original(self, *args, **kwargs)
        return wrapper

    for name in HOST_READS:
        patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    train_epoch, sync_due = loop.Trainer.train_epoch, loop.Trainer.sync_due

    def watched_epoch(self, *args, **kwargs):
        inside["trainer"] = self
        try:
            return train_epoch(self, *args, **kwargs)
        finally:
            inside.pop("trainer")

    def watched_due(self, batch):
        due = sync_due(self, batch)
        if due:
            due_steps.add(self.state.global_step)
        return due

    patch.setattr(loop.Trainer, "train_epoch", watched_epoch)
    patch.setattr(loop.Trainer, "sync_due", watched_due)
    loop.train(cfg)
    # 2 epochs of 4 steps, --log-every 3: reads after steps 3, 4 (the epoch's end), 6 and 8.
    assert due_steps == {3, 4, 6, 8}
    assert sorted(step for step, _, _ in reads) == [3, 4, 6, 8], reads


# ----------------------------------------------------------------------------- speed switches


def test_speed_switches_apply_on_cuda_only():
    cfg, _ = config(["--amp-dtype", "bf16", "--compile"])
    cpu = SpeedSettings.resolve(cfg, torch.device("cpu"))
    assert cpu == SpeedSettings(None, False, False, False, False) and not cpu.grad_scaling
    cuda = SpeedSettings.resolve(cfg, torch.device("cuda"))
    assert cuda == SpeedSettings(torch.bfloat16, True, True, True, True) and not cuda.grad_scaling
    fp16 = SpeedSettings.resolve(config([])[0], torch.device("cuda"))
    assert fp16.amp_dtype == torch.float16 and fp16.grad_scaling and not fp16.compile
    assert cuda.as_config()["amp_dtype_active"] == "bf16" and cpu.as_config()["amp_dtype_active"] is None


def test_prepare_model_compiles_in_place_and_keeps_parameter_names():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
            self.projector = torch.nn.Linear(5, 5)

        def forward(self, x):
            return self.projector(self.backbone(x))

    model = Tiny()
    x = torch.randn(3, 3, 6, 6)
    eager = model(x)
    names = list(model.state_dict())
    settings = SpeedSettings(None, channels_last=True, compile=True, fused_optimizer=False, cudnn_benchmark=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        prepare_model(model, settings)
        compiled = model(x.contiguous(memory_format=torch.channels_last))
    assert list(model.state_dict()) == names
    assert model.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.backbone._compiled_call_impl is not None and model.projector._compiled_call_impl is not None
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def watch_syncs(owner, name, patch, syncs):
    """Run ``owner.name`` under CUDA's sync debug mode from its second call on, collecting what it reports."""
    original, calls = getattr(owner, name), []

    def watched(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first call sets things up (cuDNN autotuning, the loss's path choice)
            return original(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = original(*args, **kwargs)
            syncs.extend(f"{name}: {w.message}" for w in caught if "synchroniz" in str(w.message))
            return result
        finally:
            torch.cuda.set_sync_debug_mode("default")

    patch.setattr(owner, name, watched)


@requires_cuda
@pytest.mark.parametrize("amp_dtype", ["fp16", "bf16"])
def test_cuda_run_with_every_switch_and_no_sync_in_steps_or_augmentation(cifar_folder, tmp_path, amp_dtype, patch):
    """On a GPU: device data, channels_last, fused AdamW, cuDNN autotuning and the amp dtype; CUDA's sync debug
    mode reports no synchronising call in a step or in a batch's augmentation (after the first of each)."""
    cfg, _ = config(device_args(cifar_folder, tmp_path / "run", "--epochs", "2", "--device", "cuda", "--amp-dtype",
                                amp_dtype, "--log-every", "4"))
    syncs = []
    watch_syncs(loop.TrainState, "step", patch, syncs)
    watch_syncs(BatchAugment, "views", patch, syncs)
    row = loop.train(cfg)
    assert np.isfinite(row["loss"]) and not syncs, syncs
    resolved = json.load(open(tmp_path / "run" / "config.json"))
    assert resolved["channels_last_active"] and resolved["fused_optimizer_active"] and resolved["device_data_active"]
    assert resolved["amp_dtype_active"] == amp_dtype
