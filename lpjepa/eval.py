"""``python -m lpjepa.eval --checkpoint RUN_DIR``: offline evaluation of a checkpoint (console script ``lpjepa-eval``).

A run folder's finished model, ``checkpoints/final.pt``, is evaluated; a run that has not
finished (stopped, or still training) has none, and its ``checkpoints/last.pt`` is
evaluated instead. The program first prints which file and which epoch it evaluates.
Extracts frozen backbone and projector features of the train and validation splits (no
augmentation), trains a linear probe on each offline, runs a kNN classifier on the
backbone features, prints the results and writes them to ``eval.json`` next to the run.
Every bad flag value ends in one line, ``python -m lpjepa.eval: error: ...``, and exit code 2.
"""
import json
import os

from .training.checkpoint import describe_checkpoint, evaluated_checkpoint_path, load_checkpoint
from .training.cli import ArgumentParser, Rule, at_least, check_rules, require_existing_folder, usage_errors
from .training.config import EVALUATION_RULES
from .training.evaluation import evaluate_checkpoint

DEFAULT_BATCH_SIZE = 512
DEFAULT_PROBE_EPOCHS = 100
DEFAULT_PROBE_LR = 1e-3

# One row per flag: what a value must be (flags left out take the run's values, checked when it trained).
FLAG_RULES = (
    Rule("batch_size", at_least(1), "a whole number of images >= 1"),
    Rule("probe_epochs", at_least(1), "a whole number of epochs >= 1"),
    *EVALUATION_RULES,
)


def build_parser():
    parser = ArgumentParser(
        prog="python -m lpjepa.eval",
        description="Offline linear probes (backbone and projector features) and kNN on frozen features of a checkpoint.",
    )
    add = parser.add_argument
    add("--checkpoint", required=True,
        help="a .pt written by lpjepa.train, or its run folder (uses checkpoints/final.pt; checkpoints/last.pt for a run "
             "that has not finished)")
    add("--data-dir", help="dataset location (default: the one the run trained on)")
    add("--val-dir", help="validation folder for --dataset imagefolder (default: the run's)")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (default auto)")
    add("--num-workers", type=int, help="data loader processes (default: the run's)")
    add("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"batch size of feature extraction (default {DEFAULT_BATCH_SIZE})")
    add("--probe-epochs", type=int, default=DEFAULT_PROBE_EPOCHS, help=f"epochs of each offline linear probe (default {DEFAULT_PROBE_EPOCHS})")
    add("--probe-lr", type=float, default=DEFAULT_PROBE_LR, help=f"AdamW lr of the offline probes, cosine to 0 (default {DEFAULT_PROBE_LR})")
    add("--knn-k", type=int, help="neighbours (default: the run's, 200; capped at the smallest class's number of training images)")
    add("--knn-t", type=float, help="kNN temperature (default: the run's, 0.07)")
    add("--no-download", dest="download", action="store_false", default=None, help="never download CIFAR (default: the run's --download)")
    add("--out", help="where to write the JSON results (default: RUN_DIR/eval.json)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        check_rules(vars(args), FLAG_RULES)
        if args.out is not None:
            require_existing_folder("--out", args.out)
        checkpoint = evaluated_checkpoint_path(args.checkpoint)
        loaded = load_checkpoint(checkpoint)
        print(f"evaluating {describe_checkpoint(checkpoint, loaded)}", flush=True)
        results = evaluate_checkpoint(
            checkpoint, data_dir=args.data_dir, val_dir=args.val_dir, device=args.device, num_workers=args.num_workers,
            batch_size=args.batch_size, probe_epochs=args.probe_epochs, probe_lr=args.probe_lr, knn_k=args.knn_k,
            knn_t=args.knn_t, download=args.download, loaded=loaded,
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
