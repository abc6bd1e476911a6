"""The Rectified LpJEPA model for training: a timm backbone with a choice of stem, then the seed's projector.

``LpJEPA(backbone_name, stem='imagenet')`` builds the seed's model exactly (the one
``lpjepa.reference`` keeps as the tests' oracle): same modules, same parameter names,
same initialisation under the same seed.
``stem='cifar'`` swaps the ResNet stem for the one used on 32x32 images: a 3x3 stride-1
first convolution and no max-pool, so a 32x32 image reaches the last stage as 4x4
instead of 1x1.
"""
import difflib

import timm
import torch
import torch.nn as nn

from .cli import UsageError

STEMS = ("cifar", "imagenet")
# How many of timm's names an unknown --backbone error suggests.
CLOSE_NAMES = 3
# BatchNorm needs two images; the meta-device forward of check_backbone runs a batch of this many.
CHECK_BATCH = 2


def _linear_bn_relu(dim):
    return [nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU()]


class Projector(nn.Module):
    """The seed's projector: two Linear-BatchNorm-ReLU blocks, then Linear and a final ReLU, all of width ``dim``.

    The final ReLU is what makes the output non-negative and sparse. The layers sit in
    one ``nn.Sequential`` named ``model`` and are created in the seed's order, so the
    parameter names (``model.0`` ... ``model.6``) and the initial weights under a given
    seed are the seed's.
    """

    def __init__(self, dim=512):
        super().__init__()
        blocks = _linear_bn_relu(dim) + _linear_bn_relu(dim)
        self.model = nn.Sequential(*blocks, nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x):
        return self.model(x)


# The cifar stem's first convolution: 3x3, stride 1. Its padding is --stem-padding: 1 keeps a 32x32
# image 32x32; the official run's 2 (solo/methods/base.py, YilunKuang/rectified-lp-jepa@5ae61ab) makes it 34x34.
CIFAR_STEM_KERNEL, CIFAR_STEM_STRIDE = 3, 1


def cifar_stem_layout(padding=1):
    """The cifar stem's first convolution and pooling, as plain values (for ``--print-config``)."""
    return {"kernel_size": CIFAR_STEM_KERNEL, "stride": CIFAR_STEM_STRIDE, "padding": padding, "maxpool": False}


def cifar_stem(backbone, padding=1):
    """Turn a timm ResNet-family stem into the CIFAR one, in place; returns the backbone.

    A 7x7 stride-2 ``conv1`` becomes a 3x3 stride-1 convolution with the same channels and
    ``padding``;
    a deep stem (``conv1`` a Sequential, as in resnet10t or resnet50d) keeps its
    convolutions with the first one's stride set to 1; ``maxpool`` becomes Identity.
    """
    conv1 = getattr(backbone, "conv1", None)
    if conv1 is None or not hasattr(backbone, "maxpool"):
        raise ValueError(
            f"--stem cifar needs a timm ResNet-family backbone (with conv1 and maxpool); "
            f"{type(backbone).__name__} has no such stem: use --stem imagenet for it"
        )
    if isinstance(conv1, nn.Conv2d):
        backbone.conv1 = nn.Conv2d(
            conv1.in_channels, conv1.out_channels, kernel_size=CIFAR_STEM_KERNEL, stride=CIFAR_STEM_STRIDE, padding=padding,
            bias=conv1.bias is not None,
        )
    else:
        first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    backbone.maxpool = nn.Identity()
    return backbone


def create_backbone(backbone_name="resnet18", stem="cifar", stem_padding=1, zero_init_last=True):
    """A timm model without its classifier (``num_classes=0``), randomly initialised, with the chosen stem.

    ``stem_padding``: the padding of the cifar stem's 3x3 convolution (a deep stem keeps its own).
    ``zero_init_last``: timm's ResNet initialisation (the last BatchNorm of every residual
    block starts at 0, the seed's model); False starts it at 1, as torchvision's ResNet,
    which the official run uses (a ResNet-family model only: others raise TypeError).
    """
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}; got {stem!r}")
    options = {} if zero_init_last else {"zero_init_last": False}
    backbone = timm.create_model(backbone_name, pretrained=False, num_classes=0, **options)
    return cifar_stem(backbone, stem_padding) if stem == "cifar" else backbone


def check_backbone(backbone_name, stem, image_size, stem_padding=1, zero_init_last=True):
    """Refuse, in one line, a ``--backbone`` timm does not know, a ``--stem`` it cannot take, or an ``--image-size`` it cannot run.

    The model is built on the meta device (no memory, no initialisation work) and runs
    one forward pass there, which finds what the real model would fail on (a ViT's
    fixed input size, a network that downsamples a small image to nothing) without
    computing anything.
    """
    if not timm.is_model(backbone_name):
        close = difflib.get_close_matches(backbone_name, timm.list_models(), n=CLOSE_NAMES)
        hint = f"closest timm names: {', '.join(close)}" if close else "see timm.list_models() for the names"
        raise UsageError(f"argument --backbone: invalid value {backbone_name}: not a timm model; {hint}")
    with torch.device("meta"):
        try:
            backbone = create_backbone(backbone_name, stem, stem_padding, zero_init_last)
        except ValueError as error:
            raise UsageError(f"argument --stem: invalid value {stem}: {error}") from None
        except TypeError:
            raise UsageError(f"argument --no-zero-init-last: --backbone {backbone_name} is not a timm ResNet-family "
                             f"model, which alone has that option; drop --no-zero-init-last") from None
        try:
            backbone(torch.empty(CHECK_BATCH, 3, image_size, image_size))
        except Exception as error:  # timm's models raise anything from AssertionError to RuntimeError here
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(
                f"argument --image-size: invalid value {image_size}: --backbone {backbone_name} with --stem {stem} "
                f"cannot take {image_size}x{image_size} images ({reason})"
            ) from None


def feature_width(backbone_name):
    """The width of a timm backbone's features (and so of the projector), from a model on the meta device."""
    with torch.device("meta"):
        return timm.create_model(backbone_name, pretrained=False, num_classes=0).num_features


def projector_layout(width):
    """The projector's shape as plain values (for ``--print-config``): see ``Projector``."""
    return {"hidden_dim": width, "output_dim": width, "layers": 3, "final_relu": True}


class LpJEPA(nn.Module):
    """Backbone then the seed's 3-layer projector ending in a ReLU.

    The projector's width is the backbone's feature width (512 for ResNet-18, as in the
    seed). ``forward(x)`` returns the projector output z (N, dim), as the seed's model
    does; ``forward(x, with_features=True)`` (or ``features(x)``) returns ``(h, z)`` with
    h the backbone features, for the probes.
    """

    def __init__(self, backbone_name="resnet18", stem="cifar", stem_padding=1, zero_init_last=True):
        super().__init__()
        # Backbone first, then projector: the seed's order, so the same seed gives the same weights.
        self.backbone = create_backbone(backbone_name, stem, stem_padding, zero_init_last)
        self.projector = Projector(dim=self.backbone.num_features)

    @property
    def feature_dim(self):
        return self.backbone.num_features

    def features(self, x):
        return self.forward(x, with_features=True)

    def forward(self, x, with_features=False):
        h = self.backbone(x)
        z = self.projector(h)
        return (h, z) if with_features else z


def synchronised_batchnorm(model, enabled, device):
    """``model`` with every BatchNorm a ``SyncBatchNorm`` when ``enabled`` and ``device`` is CUDA, else as it is.

    The converted modules hold the same Parameter objects and buffers, so an optimizer
    built on the model's parameters still steps them. torch's ``SyncBatchNorm`` runs on
    GPUs only: on the CPU (gloo) each process keeps its own statistics.
    """
    if not enabled or torch.device(device).type != "cuda":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
