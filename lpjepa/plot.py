"""``python -m lpjepa.plot RUN_DIR``: loss, accuracy and sparsity curves of a run, as PNG files.

Reads ``RUN_DIR/metrics.csv`` and writes ``loss.png``, ``accuracy.png`` and
``sparsity.png`` into ``RUN_DIR`` (or ``--out``). Columns a run did not log (epochs
without evaluation) are skipped.
"""
import argparse

from .training.plot import plot_run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lpjepa.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder written by lpjepa.train")
    parser.add_argument("--out", help="folder for the PNGs (default: the run folder)")
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir, args.out):
        print(path)


if __name__ == "__main__":
    main()
