"""Rectified LpJEPA pretraining: ``python -m lpjepa.train`` (console script ``lpjepa-train``).

Defaults are the seed notebook's: ResNet-18 (timm) and the 3-layer ReLU projector,
100 epochs, batch 256, AdamW lr 1e-3 / weight decay 1e-4, lamb_inv 25, lamb_reg 125,
p = 1, mu = 0, 256 projections, the seed's augmentation, mixed precision on CUDA; the
one deliberate change is ``--stem cifar``. ``--preset paper`` switches to the
published CIFAR-100 recipe. Every epoch ends with online linear probes, kNN and the
sparsity metrics on the validation split, a row of ``metrics.csv`` and a checkpoint.

Multi-GPU: ``torchrun --nproc_per_node N -m lpjepa.train ...`` (DDP; ``--batch-size``
is the global batch, split over the processes).
"""
from .training.config import build_parser, resolve_config
from .training.loop import train


def main(argv=None):
    cfg, checkpoint = resolve_config(build_parser().parse_args(argv))
    train(cfg, checkpoint)


if __name__ == "__main__":
    main()
