"""Rectified LpJEPA pretraining: ``python -m lpjepa.train`` (console script ``lpjepa-train``).

Defaults are the seed notebook's: ResNet-18 (timm) and the 3-layer ReLU projector,
100 epochs, batch 256, AdamW lr 1e-3 / weight decay 1e-4, lamb_inv 25, lamb_reg 125,
p = 1, mu = 0, 256 projections, the seed's augmentation, mixed precision on CUDA; the
one deliberate change is ``--stem cifar``. ``--preset paper`` switches to the
official CIFAR-100 run (docs/training.md). ``--print-config`` prints the resolved
configuration as JSON and exits. Every epoch ends with online linear probes, kNN and the
sparsity metrics on the validation split, a row of ``metrics.csv`` and a checkpoint.

A loss that becomes NaN or inf stops the run with exit code 3 and a message naming the
step, the loss parts there, the likely causes and the last good checkpoint.

Multi-GPU: ``torchrun --nproc_per_node N -m lpjepa.train ...`` (DDP; ``--batch-size``
is the global batch, split over the processes).
"""
import json

from .training.cli import usage_errors
from .training.config import build_parser, resolve_config, resolved_recipe


def main(argv=None):
    """Every bad flag value ends in one line, ``python -m lpjepa.train: error: ...``, and exit code 2.

    ``--print-config``: print ``resolved_recipe`` of the config as JSON and return, before
    any data, device or run folder is touched.
    """
    parser = build_parser()
    with usage_errors(parser):
        args = parser.parse_args(argv)
        cfg, checkpoint = resolve_config(args)
        if args.print_config:
            print(json.dumps(resolved_recipe(cfg), indent=2))
            return
        from .training.loop import train  # the training machinery only for a run

        train(cfg, checkpoint)


if __name__ == "__main__":
    main()
