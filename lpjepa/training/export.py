"""A run's pretrained backbone and projector as safetensors files that timm and plain torch load.

``export_checkpoint`` writes the backbone's ``state_dict`` (timm's own parameter names,
without the classifier: the model is built with ``num_classes=0``) to one file and the
projector's to another, each with the run's backbone name, stem, epoch and feature width
in the file's metadata. ``loading_code`` gives the lines that load the backbone file
with timm alone:

- ``--stem imagenet``: timm's own loader,
  ``timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=FILE, num_classes=0))``
  (``num_classes=0`` in the overlay too, so that timm loads strictly and a missing
  weight is an error, not a silent random init);
- ``--stem cifar``: timm has no option for a stride-1 stem without max-pool, so
  ``pretrained=True`` cannot build it (on a ResNet-18 the 3x3 ``conv1`` does not fit the
  7x7 one; on a deep stem such as resnet10t's the shapes fit but the model would run
  the strides of the ImageNet stem). The equivalent: create the timm model, change its
  stem as training did, then ``load_state_dict(safetensors.torch.load_file(FILE))``.

``load_backbone(FILE)`` does the same from the file's metadata in one call.
"""
import os

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .model import create_backbone

FORMAT = "lpjepa-export"
SUFFIX = ".safetensors"
# What open() asks for when it creates a file; the umask then takes away from it.
DEFAULT_FILE_MODE = 0o666


def _part(model_state, prefix):
    """The entries of an ``LpJEPA`` state dict under ``prefix.``, without it, as contiguous tensors (safetensors' need)."""
    start = len(prefix) + 1
    return {key[start:]: value.contiguous() for key, value in model_state.items() if key.startswith(prefix + ".")}


def projector_path(out):
    """The projector's file next to the backbone's: ``NAME.safetensors`` -> ``NAME-projector.safetensors``."""
    return out[: -len(SUFFIX)] + "-projector" + SUFFIX


def export_checkpoint(checkpoint, out, projector_out=None):
    """Write a loaded checkpoint's backbone to ``out`` and its projector to ``projector_out``; returns both paths.

    checkpoint: a dict written by ``lpjepa.train`` (``last.pt``, ``final.pt``, ``epoch_NNNN.pt``).
    out: a path ending in ``.safetensors``, in a folder that exists; projector_out defaults to ``projector_path(out)``.
    """
    cfg = checkpoint["config"]
    backbone, projector = _part(checkpoint["model"], "backbone"), _part(checkpoint["model"], "projector")
    metadata = {
        "format": FORMAT, "backbone": cfg["backbone"], "stem": cfg["stem"],
        "stem_padding": str(cfg.get("stem_padding", 1)), "epoch": str(checkpoint["epoch"]),
        "feature_dim": str(projector["model.0.weight"].shape[1]), "image_size": str(cfg["image_size"]),
        "dataset": cfg["dataset"],
    }
    projector_out = projector_out or projector_path(out)
    save_file(backbone, out, metadata=dict(metadata, part="backbone"))
    save_file(projector, projector_out, metadata=dict(metadata, part="projector"))
    for path in (out, projector_out):
        _readable_as_umask_allows(path)
    return out, projector_out


def _readable_as_umask_allows(path):
    """safetensors creates its files readable by their owner alone; give them the permissions any new file gets."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, DEFAULT_FILE_MODE & ~umask)


def read_metadata(path):
    """The metadata ``export_checkpoint`` wrote into a file (a dict of strings)."""
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def load_backbone(path):
    """The exported backbone as a timm model with the stem it was trained with, in eval mode (strict load)."""
    metadata = read_metadata(path)
    backbone = create_backbone(metadata["backbone"], metadata["stem"], int(metadata.get("stem_padding", "1")))
    backbone.load_state_dict(load_file(path))
    return backbone.eval()


def _cifar_stem_lines(backbone_name, padding=1):
    """The lines that turn a fresh timm model into ``model.cifar_stem``'s (with ``padding``), for the model named."""
    conv1 = create_backbone(backbone_name, "imagenet").conv1
    if isinstance(conv1, nn.Conv2d):
        bias = conv1.bias is not None
        return [f"backbone.conv1 = torch.nn.Conv2d({conv1.in_channels}, {conv1.out_channels}, kernel_size=3, stride=1, "
                f"padding={padding}, bias={bias})"]
    first = next(name for name, module in conv1.named_modules() if isinstance(module, nn.Conv2d))
    return [f'backbone.get_submodule("conv1.{first}").stride = (1, 1)']


def loading_code(backbone_name, stem, path, stem_padding=1):
    """Python lines that load the exported backbone file ``path`` with timm, torch and safetensors alone."""
    if stem == "imagenet":
        return "\n".join([
            "import timm",
            f'backbone = timm.create_model("{backbone_name}", pretrained=True, num_classes=0,',
            f'                             pretrained_cfg_overlay=dict(file="{path}", num_classes=0))',
        ])
    return "\n".join([
        "import timm, torch",
        "from safetensors.torch import load_file",
        f'backbone = timm.create_model("{backbone_name}", num_classes=0)',
        "# the CIFAR stem the run trained with (timm has no option for it): stride 1, no max-pool",
        *_cifar_stem_lines(backbone_name, stem_padding),
        "backbone.maxpool = torch.nn.Identity()",
        f'backbone.load_state_dict(load_file("{path}"))',
    ])
