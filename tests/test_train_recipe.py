"""``--preset paper`` is the official CIFAR-100 run, value by value; ``--print-config`` shows it; LARS and the schedule.

Every row of ``OFFICIAL`` is one value of the official run with the file it comes from:
the run's config (YilunKuang/rectified-lp-jepa at 5ae61ab,
scripts/pretrain/cifar/rectified_lpjepa_cifar100.yaml) or, where it leaves a value out,
the solo-learn code in the same repository that fills it in. The test reads each value
from what ``python -m lpjepa.train --print-config --preset paper`` prints.
LARS and the warm-up-then-cosine schedule are checked against steps computed by hand
from solo-learn's formulas.
"""
import contextlib
import io
import json
import math
import os

import pytest
import torch

from lpjepa import train
from lpjepa.training import data, optim
from lpjepa.training.config import build_parser, resolve_config
from lpjepa.training.model import LpJEPA

REPO = "YilunKuang/rectified-lp-jepa@5ae61ab49a4ae489c68f2328ba614472163518d6"
YAML = f"{REPO}:scripts/pretrain/cifar/rectified_lpjepa_cifar100.yaml"
BASE = f"{REPO}:solo/methods/base.py"
ARGS = f"{REPO}:solo/args/pretrain.py"
LARS = f"{REPO}:solo/utils/lars.py"
DATA = f"{REPO}:solo/data/pretrain_dataloader.py"
SCHEDULER = f"{REPO}:solo/utils/lr_scheduler.py"
LOSS = f"{REPO}:solo/losses/rectified_lpjepa.py"
METHOD = f"{REPO}:solo/methods/rectified_lpjepa.py"

# (path in --print-config's JSON, official value, source and what it says there).
OFFICIAL = [
    # data and augmentation
    ("config.dataset", "cifar100", f"{YAML} data.dataset"),
    ("resolved.augmentation.crop_size", 32, f"{YAML} augmentations.crop_size"),
    ("resolved.augmentation.scale", [0.2, 1.0], f"{YAML} augmentations.rrc crop_min_scale / crop_max_scale"),
    ("resolved.augmentation.ratio", [3 / 4, 4 / 3], f"{DATA} RandomResizedCrop without ratio: torchvision's (3/4, 4/3)"),
    ("resolved.augmentation.interpolation", "bicubic", f"{DATA} build_transform_pipeline: InterpolationMode.BICUBIC"),
    ("resolved.augmentation.jitter", [0.4, 0.4, 0.2, 0.1], f"{YAML} augmentations.color_jitter brightness/contrast/saturation/hue"),
    ("resolved.augmentation.jitter_p", 0.8, f"{YAML} augmentations.color_jitter.prob"),
    ("resolved.augmentation.grayscale_p", 0.2, f"{YAML} augmentations.grayscale.prob"),
    ("resolved.augmentation.blur_p", 0.0, f"{YAML} augmentations.gaussian_blur enabled False"),
    ("resolved.augmentation.solarize_p", 0.1, f"{YAML} augmentations.solarization.prob"),
    ("resolved.augmentation.solarize_threshold", 128, f"{DATA} Solarization: ImageOps.solarize's default threshold"),
    ("resolved.augmentation.flip_p", 0.5, f"{YAML} augmentations.horizontal_flip.prob"),
    ("resolved.augmentation.mean", [0.5071, 0.4865, 0.4409], f"{DATA} MEANS_N_STD['cifar100']"),
    ("resolved.augmentation.std", [0.2673, 0.2564, 0.2762], f"{DATA} MEANS_N_STD['cifar100']"),
    # model
    ("config.backbone", "resnet18", f"{YAML} backbone.name"),
    ("resolved.stem", {"name": "cifar", "kernel_size": 3, "stride": 1, "padding": 2, "maxpool": False},
     f"{BASE} cifar: Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False), maxpool Identity"),
    ("resolved.projector", {"hidden_dim": 512, "output_dim": 512, "layers": 3, "final_relu": True},
     f"{YAML} proj_hidden_dim / proj_output_dim 512, projector_type rectified_mlp ({METHOD})"),
    ("resolved.residual_bn_init", "one (torchvision)",
     f"{REPO}:solo/backbones/resnet/resnet.py torchvision's resnet18, zero_init_residual False"),
    ("resolved.sync_batchnorm.on", True, f"{YAML} sync_batchnorm: True"),
    ("resolved.precision", "fp16 mixed on CUDA", f"{YAML} precision: 16-mixed"),
    # optimisation
    ("config.epochs", 1000, f"{YAML} max_epochs"),
    ("resolved.batch_per_device", 256, f"{YAML} optimizer.batch_size (per device: {ARGS} scales by it x devices)"),
    ("config.lr", 0.03, f"{YAML} optimizer.lr"),
    ("config.lr_scaling", "linear", f"{ARGS} lr x batch_size x devices x nodes / 256"),
    ("resolved.optimizer.name", "lars", f"{YAML} optimizer.name"),
    ("resolved.optimizer.lr", 0.03, f"{ARGS} 0.03 x 256 x 1 / 256 on one device"),
    ("resolved.optimizer.weight_decay", 1e-4, f"{YAML} optimizer.weight_decay"),
    ("resolved.optimizer.momentum", 0.9, f"{ARGS} optimizer.kwargs.momentum default for lars"),
    ("resolved.optimizer.eta", 0.02, f"{YAML} optimizer.kwargs.eta"),
    ("resolved.optimizer.clip_lr", True, f"{YAML} optimizer.kwargs.clip_lr"),
    ("resolved.optimizer.exclude_bias_n_norm", True, f"{YAML} optimizer.kwargs.exclude_bias_n_norm"),
    ("resolved.optimizer.eps", 1e-8, f"{LARS} LARS eps default"),
    ("resolved.schedule.name", "cosine", f"{YAML} scheduler.name warmup_cosine ({SCHEDULER})"),
    ("resolved.schedule.interval", "step", f"{BASE} scheduler.interval default 'step'"),
    ("resolved.schedule.warmup_epochs", 10, f"{BASE} scheduler.warmup_epochs default 10"),
    ("resolved.schedule.warmup_start_lr", 3e-5, f"{BASE} scheduler.warmup_start_lr default 3e-5"),
    ("resolved.schedule.min_lr", 0.0, f"{BASE} scheduler.min_lr default 0.0"),
    # the online classifiers
    ("resolved.probes.on", ["backbone features (detached)", "projector outputs (detached)"],
     f"{BASE} classifier(feats.detach()); {YAML} add_projector_classifier true"),
    ("resolved.probes.optimizer", "lars", f"{BASE} learnable_params: the classifiers are groups of the model's optimizer"),
    ("resolved.probes.lr", 0.01, f"{YAML} optimizer.classifier_lr, scaled like the lr by {ARGS}"),
    ("resolved.probes.weight_decay", 0.0, f"{BASE} learnable_params: classifier weight_decay 0"),
    ("resolved.probes.schedule", "cosine", f"{BASE} configure_optimizers: one scheduler over every group"),
    # the loss
    ("resolved.loss.lamb_inv", 25.0, f"{YAML} method_kwargs.invariance_loss_weight"),
    ("resolved.loss.lamb_reg", 250.0, f"{YAML} method_kwargs.rdm_reg_loss_weight"),
    ("resolved.loss.p", 1.0, f"{YAML} method_kwargs.lp_norm_parameter"),
    ("resolved.loss.mu", 0.0, f"{YAML} method_kwargs.mean_shift_value"),
    ("resolved.loss.sigma", "gn", f"{YAML} method_kwargs.mode_of_sigma sigma_GN"),
    ("resolved.loss.num_projections", 8192, f"{YAML} method_kwargs.num_projections"),
    ("resolved.loss.target_law", "rectified", f"{YAML} method_kwargs.target_distribution rectified_lp_distribution"),
    ("resolved.loss.directions", "gaussian", f"{YAML} method_kwargs.projection_vectors_type random"),
    ("resolved.loss.target_draw", "per-view", f"{LOSS} sliced_wasserstein_distance_for_one_view draws its own target"),
]


def printed_config(argv, capsys):
    train.main(["--print-config", *argv])
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def paper_config():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.main(["--print-config", "--preset", "paper"])
    return json.loads(out.getvalue())


def lookup(tree, path):
    for key in path.split("."):
        tree = tree[key]
    return tree


@pytest.mark.parametrize("path, official, source", OFFICIAL, ids=[row[0] for row in OFFICIAL])
def test_paper_preset_is_the_official_run(path, official, source, paper_config):
    value = lookup(paper_config, path)
    assert value == (pytest.approx(official) if isinstance(official, (float, list)) else official), source


def test_print_config_reads_no_data_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        printed = printed_config(["--dataset", "imagefolder", "--data-dir", str(missing), "--no-download"], capsys)
    finally:
        os.chdir(here)
    assert printed["config"]["data_dir"] == str(missing) and printed["config"]["preset"] == "seed"
    assert list(tmp_path.iterdir()) == []  # no data, no run folder


def test_default_run_stays_the_seed_recipe(capsys):
    printed = printed_config([], capsys)
    resolved = printed["resolved"]
    assert (resolved["optimizer"]["name"], resolved["optimizer"]["lr"], resolved["schedule"]["name"]) == ("adamw", 1e-3, "constant")
    assert resolved["augmentation"]["scale"] == [0.08, 1.0] and resolved["augmentation"]["interpolation"] == "bilinear"
    assert resolved["augmentation"]["mean"] == [0.5071, 0.4867, 0.4408]
    assert resolved["stem"]["padding"] == 1 and resolved["loss"]["target_draw"] == "shared"
    assert resolved["probes"]["optimizer"] == "adamw" and resolved["sync_batchnorm"]["on"] is False


def test_paper_under_torchrun_scales_batch_and_learning_rates(capsys, patch):
    """solo/args/pretrain.py: 256 per device, lr and classifier lr x (256 x devices) / 256; BatchNorm synchronised."""
    patch.setenv("WORLD_SIZE", "4")
    resolved = printed_config(["--preset", "paper"], capsys)["resolved"]
    assert (resolved["world_size"], resolved["batch_size"], resolved["batch_per_device"]) == (4, 1024, 256)
    assert resolved["optimizer"]["lr"] == pytest.approx(0.12) and resolved["probes"]["lr"] == pytest.approx(0.04)
    assert resolved["sync_batchnorm"] == {"on": True, "active": True}
    # A global --batch-size given beats the preset's batch per device.
    resolved = printed_config(["--preset", "paper", "--batch-size", "512"], capsys)["resolved"]
    assert (resolved["batch_size"], resolved["batch_per_device"]) == (512, 128)
    assert resolved["optimizer"]["lr"] == pytest.approx(0.06)


@pytest.mark.parametrize("old, new", [("--target", "--target-law"), ("--targets", "--target-draw")])
def test_renamed_loss_flags_old_name_is_one_line(old, new, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([old, "per-view" if old == "--targets" else "dense"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    # --target is a prefix of both new names: argparse says it is ambiguous and names them; --targets is unknown.
    assert len(error) == 1 and error[0].startswith("python -m lpjepa.train: error:") and old in error[0]
    assert ("unrecognized arguments" in error[0]) if old == "--targets" else (new in error[0])
    assert build_parser().parse_args([new, "per-view" if new == "--target-draw" else "dense"])


def test_paper_model_has_the_official_stem_and_initialisation():
    cfg, _ = resolve_config(build_parser().parse_args(["--preset", "paper"]))
    model = LpJEPA(cfg["backbone"], cfg["stem"], cfg["stem_padding"], cfg["zero_init_last"])
    # torchvision's ResNet-18 starts every BatchNorm at weight 1 (timm's default zeroes each block's last one).
    assert all(bool((m.weight == 1).all()) for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not bool(LpJEPA("resnet18", "cifar").backbone.layer1[0].bn2.weight.any())
    conv = model.backbone.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (2, 2), None)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    assert model.backbone.conv1(torch.rand(1, 3, 32, 32)).shape[-1] == 34  # padding 2 widens 32 to 34


def test_paper_pil_pipeline_is_the_official_one():
    crop, apply_jitter, gray, solar, flip, _, normalize = data.train_transform("paper", 32, "cifar100").transforms
    assert tuple(crop.scale) == (0.2, 1.0) and crop.interpolation == data.INTERPOLATIONS["bicubic"]
    jitter = apply_jitter.transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    assert (apply_jitter.p, gray.p, solar.p, solar.threshold, flip.p) == (0.8, 0.2, 0.1, 128, 0.5)
    assert (tuple(normalize.mean), tuple(normalize.std)) == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert data.eval_transform(32, "cifar100", "paper").transforms[-1].mean == normalize.mean


# ----------------------------------------------------------------------------- LARS and the schedule by hand


def test_lars_step_by_hand():
    """Two steps of solo-learn's LARS on a weight, a bias and a zero weight, computed by hand in float64."""
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))  # ||w|| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    zero = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    lr, wd, eta, momentum = 0.5, 0.1, 0.02, 0.9
    opt = optim.LARS([weight, bias, zero], lr=lr, momentum=momentum, weight_decay=wd, eta=eta, clip_lr=True,
                     exclude_bias_n_norm=True)
    g_w, g_b, g_z = torch.tensor([[0.0, 2.0]], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    weight.grad, bias.grad, zero.grad = g_w.clone(), g_b.clone(), g_z.clone()
    opt.step()
    # weight: rate = 0.02 * 5 / (2 + 0.1 * 5 + 1e-8) = 0.04; clipped: min(0.04 / 0.5, 1) = 0.08.
    rate = min(eta * 5 / (2 + wd * 5 + 1e-8) / lr, 1.0)
    update_w = (g_w + wd * torch.tensor([[3.0, 4.0]], dtype=torch.float64)) * rate
    expected_w = torch.tensor([[3.0, 4.0]], dtype=torch.float64) - lr * update_w
    torch.testing.assert_close(weight.detach(), expected_w, rtol=0, atol=1e-15)
    # bias: 1-d and excluded: plain SGD, no weight decay. zero weight: ||p|| = 0, so the gradient as it is.
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64) - lr * g_b, rtol=0, atol=1e-15)
    torch.testing.assert_close(zero.detach(), -lr * g_z, rtol=0, atol=1e-15)
    # Second step: momentum buffer = 0.9 * first update + this one.
    w1 = weight.detach().clone()
    weight.grad, bias.grad, zero.grad = g_w.clone(), g_b.clone(), g_z.clone()
    opt.step()
    norm = float(w1.norm())
    rate2 = min(eta * norm / (2 + wd * norm + 1e-8) / lr, 1.0)
    buffer = momentum * update_w + (g_w + wd * w1) * rate2
    torch.testing.assert_close(weight.detach(), w1 - lr * buffer, rtol=0, atol=1e-15)


def test_lars_without_clip_and_with_norms_adapted():
    p = torch.nn.Parameter(torch.tensor([2.0, 0.0], dtype=torch.float64))  # 1-d, but exclusion off
    opt = optim.LARS([p], lr=0.1, momentum=0.0, weight_decay=0.0, eta=0.5)
    p.grad = torch.tensor([0.0, 4.0], dtype=torch.float64)
    opt.step()
    rate = 0.5 * 2 / (4 + 1e-8)  # not clipped: 0.25, not min(0.25 / 0.1, 1)
    torch.testing.assert_close(p.detach(), torch.tensor([2.0, -0.1 * 4 * rate], dtype=torch.float64), rtol=0, atol=1e-15)


def test_schedule_is_solo_learn_warmup_then_cosine_per_step():
    """LinearWarmupCosineAnnealingLR's closed form: 3e-5 at step 0, base at step W - 1 and W, base/2 halfway, then 0."""
    warmup, total, base, start = 5, 25, 0.3, 3e-5
    lrs = [optim.warmup_cosine_lr(t, base, warmup, total, start) for t in range(total + 2)]
    assert lrs[0] == start and lrs[2] == pytest.approx(start + 2 * (base - start) / 4)
    assert lrs[warmup - 1] == pytest.approx(base) and lrs[warmup] == pytest.approx(base)
    assert lrs[15] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert lrs[total] == pytest.approx(0.0, abs=1e-15) and lrs[total + 1] == pytest.approx(0.0, abs=1e-15)
    # Every group from its own base lr (the classifiers' 0.01 beside the model's 0.03), all from the same start.
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.03}, {"params": [params[1]], "lr": 0.01}])
    schedule = optim.WarmupCosine(opt, warmup, total, start)
    assert [g["lr"] for g in opt.param_groups] == [start, start]
    schedule.step_update(warmup)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.03, 0.01])


def test_paper_probes_are_lars_on_the_models_schedule():
    cfg, _ = resolve_config(build_parser().parse_args(["--preset", "paper", "--epochs", "3", "--warmup-epochs", "1"]))
    probes = torch.nn.Linear(4, 3)
    probe_optimizer = optim.build_probe_optimizer(probes, cfg)
    assert isinstance(probe_optimizer, optim.LARS)
    assert [(g["lr"], g["weight_decay"], g["eta"], g["clip_lr"]) for g in probe_optimizer.param_groups] == [(0.01, 0.0, 0.02, True)]
    schedule = optim.build_probe_scheduler(probe_optimizer, cfg, steps_per_epoch=4)
    assert probe_optimizer.param_groups[0]["lr"] == pytest.approx(3e-5)
    schedule.step_update(3)
    assert probe_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    seed_cfg, _ = resolve_config(build_parser().parse_args([]))
    assert optim.build_probe_scheduler(optim.build_probe_optimizer(probes, seed_cfg), seed_cfg, 4) is None


def test_no_zero_init_last_on_a_model_without_it_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--print-config", "--backbone", "vit_tiny_patch16_224", "--stem", "imagenet", "--no-zero-init-last"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "argument --no-zero-init-last:" in error[0] and "drop --no-zero-init-last" in error[0]


def test_sync_batchnorm_converts_on_cuda_only_and_keeps_the_parameters():
    from lpjepa.training.model import synchronised_batchnorm

    model = LpJEPA("resnet10t", "cifar")
    params, keys = list(model.parameters()), list(model.state_dict())
    assert synchronised_batchnorm(model, True, "cpu") is model  # no SyncBatchNorm on the CPU
    assert synchronised_batchnorm(model, False, "cuda") is model
    synced = synchronised_batchnorm(model, True, "cuda")  # converting runs anywhere; its forward needs a GPU
    norms = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert [id(p) for p in synced.parameters()] == [id(p) for p in params]
    assert list(synced.state_dict()) == keys  # checkpoints keep their keys
