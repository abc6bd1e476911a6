"""``python -m lpjepa.export``: the backbone round-trips through timm with the features it had in training.

For each stem the exported file is loaded the way the program prints (timm's own
``pretrained=True`` loader for the ImageNet stem; timm's model, the CIFAR stem, then
``load_state_dict`` for the CIFAR one) and must give the trained backbone's features.
"""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from lpjepa import export as lp_export
from lpjepa.training.checkpoint import final_checkpoint
from lpjepa.training.export import export_checkpoint, load_backbone, loading_code, read_metadata
from lpjepa.training.model import LpJEPA, Projector
from test_train import load

IMAGES = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def trained_model(checkpoint):
    cfg = checkpoint["config"]
    model = LpJEPA(cfg["backbone"], cfg["stem"])
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def run_loading_code(code):
    """Execute the lines the program prints; returns the ``backbone`` they build."""
    scope = {}
    exec(code, scope)
    return scope["backbone"].eval()


@torch.no_grad()
def test_export_of_a_trained_run_loads_back_with_the_same_features(one_epoch_run, tmp_path, capsys):
    (tmp_path / "exported").mkdir()
    out = tmp_path / "exported" / "backbone.safetensors"
    lp_export.main([str(one_epoch_run), "--out", str(out)])
    printed = capsys.readouterr().out
    projector_file = tmp_path / "exported" / "backbone-projector.safetensors"
    assert out.is_file() and projector_file.is_file()
    assert printed.startswith(f"from {one_epoch_run / 'checkpoints' / 'final.pt'} (epoch 1: the finished run)\n")
    checkpoint = load(one_epoch_run / "checkpoints" / "final.pt")
    model = trained_model(checkpoint)
    h, z = model.features(IMAGES)

    # The code the program prints (timm, torch and safetensors alone), and load_backbone.
    code = printed.split("load the backbone with timm:\n", 1)[1]
    assert "pretrained=True" not in code and 'get_submodule("conv1.0").stride = (1, 1)' in code  # resnet10t's deep stem
    for backbone in (run_loading_code(code), load_backbone(str(out))):
        torch.testing.assert_close(backbone(IMAGES), h, rtol=0, atol=0)
    projector = Projector(int(read_metadata(str(projector_file))["feature_dim"]))
    projector.load_state_dict(load_file(str(projector_file)))  # strict: every weight is in the file, no other
    torch.testing.assert_close(projector.eval()(h), z, rtol=0, atol=0)
    metadata = read_metadata(str(out))
    assert (metadata["backbone"], metadata["stem"], metadata["epoch"], metadata["part"]) == ("resnet10t", "cifar", "1", "backbone")
    assert not any(key.startswith(("backbone.", "projector.")) for key in load_file(str(out)))


def randomized_checkpoint(backbone, stem, image_size=32):
    """A final checkpoint of an untrained model whose BatchNorm statistics are not the defaults."""
    torch.manual_seed(0)
    model = LpJEPA(backbone, stem)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)

    class State:
        global_step = 0

    State.model, State.probes = model, torch.nn.Linear(1, 1)
    cfg = {"backbone": backbone, "stem": stem, "image_size": image_size, "dataset": "cifar100"}
    return final_checkpoint(cfg, State, epoch=3), model.eval()


@torch.no_grad()
@pytest.mark.parametrize("backbone,stem", [("resnet10t", "imagenet"), ("resnet18", "imagenet"), ("resnet18", "cifar")])
def test_each_stem_loads_through_timm_with_the_same_features(backbone, stem, tmp_path):
    checkpoint, model = randomized_checkpoint(backbone, stem)
    out, _ = export_checkpoint(checkpoint, str(tmp_path / "b.safetensors"))
    images = torch.randn(2, 3, 32, 32)
    expected = model.backbone(images)
    code = loading_code(backbone, stem, out)
    if stem == "imagenet":  # timm's own pretrained loader, strict
        assert "timm.create_model(" in code and "pretrained=True" in code and "pretrained_cfg_overlay" in code
        direct = timm.create_model(backbone, pretrained=True, num_classes=0,
                                   pretrained_cfg_overlay=dict(file=out, num_classes=0)).eval()
        torch.testing.assert_close(direct(images), expected, rtol=0, atol=0)
    torch.testing.assert_close(run_loading_code(code)(images), expected, rtol=0, atol=0)


def test_the_export_metadata_is_plain_json_strings(one_epoch_run, tmp_path):
    out, projector = export_checkpoint(load(one_epoch_run / "checkpoints" / "final.pt"), str(tmp_path / "x.safetensors"))
    assert projector.endswith("x-projector.safetensors")
    json.dumps(read_metadata(out))  # safetensors keeps str -> str only
