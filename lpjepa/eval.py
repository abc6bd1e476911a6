"""``python -m lpjepa.eval --checkpoint RUN_DIR``: offline evaluation of a checkpoint (console script ``lpjepa-eval``).

Extracts frozen backbone and projector features of the train and validation splits (no
augmentation), trains a linear probe on each offline, runs a kNN classifier on the
backbone features, prints the results and writes them to ``eval.json`` next to the run.
"""
import argparse
import json
import os

from .training.checkpoint import checkpoint_path
from .training.evaluation import evaluate_checkpoint


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m lpjepa.eval",
        description="Offline linear probes (backbone and projector features) and kNN on frozen features of a checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="a .pt written by lpjepa.train, or its run folder (uses checkpoints/last.pt)")
    parser.add_argument("--data-dir", help="dataset location (default: the one the run trained on)")
    parser.add_argument("--val-dir", help="validation folder for --dataset imagefolder (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--batch-size", type=int, default=512, help="batch size of feature extraction")
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument("--probe-lr", type=float, default=1e-3)
    parser.add_argument("--knn-k", type=int, help="neighbours (default: the run's, 200)")
    parser.add_argument("--knn-t", type=float, help="kNN temperature (default: the run's, 0.07)")
    parser.add_argument("--no-download", dest="download", action="store_false", default=None)
    parser.add_argument("--out", help="where to write the JSON results (default: RUN_DIR/eval.json)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    checkpoint = checkpoint_path(args.checkpoint)
    results = evaluate_checkpoint(
        checkpoint, data_dir=args.data_dir, val_dir=args.val_dir, device=args.device, num_workers=args.num_workers,
        batch_size=args.batch_size, probe_epochs=args.probe_epochs, probe_lr=args.probe_lr, knn_k=args.knn_k,
        knn_t=args.knn_t, download=args.download,
    )
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))  # RUN_DIR/checkpoints/NAME.pt
    out = args.out or os.path.join(run_dir, "eval.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    for key, value in results.items():
        print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
