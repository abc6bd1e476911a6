"""The Rectified LpJEPA model for training: a timm backbone with a choice of stem, then the seed's projector.

``LpJEPA(backbone_name, stem='imagenet')`` builds the seed's model exactly (the one
``lpjepa.reference`` keeps as the tests' oracle): same modules, same parameter names,
same initialisation under the same seed.
``stem='cifar'`` swaps the ResNet stem for the one used on 32x32 images: a 3x3 stride-1
first convolution and no max-pool, so a 32x32 image reaches the last stage as 4x4
instead of 1x1.
"""
import timm
import torch.nn as nn

STEMS = ("cifar", "imagenet")


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


def cifar_stem(backbone):
    """Turn a timm ResNet-family stem into the CIFAR one, in place; returns the backbone.

    A 7x7 stride-2 ``conv1`` becomes a 3x3 stride-1 convolution with the same channels;
    a deep stem (``conv1`` a Sequential, as in resnet10t or resnet50d) keeps its
    convolutions with the first one's stride set to 1; ``maxpool`` becomes Identity.
    """
    conv1 = getattr(backbone, "conv1", None)
    if conv1 is None or not hasattr(backbone, "maxpool"):
        raise ValueError(
            f"--stem cifar knows timm ResNet-family backbones (with conv1 and maxpool); "
            f"{type(backbone).__name__} has no such stem: use --stem imagenet for it"
        )
    if isinstance(conv1, nn.Conv2d):
        backbone.conv1 = nn.Conv2d(
            conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=conv1.bias is not None
        )
    else:
        first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    backbone.maxpool = nn.Identity()
    return backbone


def create_backbone(backbone_name="resnet18", stem="cifar"):
    """A timm model without its classifier (``num_classes=0``), randomly initialised, with the chosen stem."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}; got {stem!r}")
    backbone = timm.create_model(backbone_name, pretrained=False, num_classes=0)
    return cifar_stem(backbone) if stem == "cifar" else backbone


class LpJEPA(nn.Module):
    """Backbone then the seed's 3-layer projector ending in a ReLU.

    The projector's width is the backbone's feature width (512 for ResNet-18, as in the
    seed). ``forward(x)`` returns the projector output z (N, dim), as the seed's model
    does; ``forward(x, with_features=True)`` (or ``features(x)``) returns ``(h, z)`` with
    h the backbone features, for the probes.
    """

    def __init__(self, backbone_name="resnet18", stem="cifar"):
        super().__init__()
        # Backbone first, then projector: the seed's order, so the same seed gives the same weights.
        self.backbone = create_backbone(backbone_name, stem)
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
