"""``python -m lpjepa.plot RUN_DIR``: loss, accuracy and sparsity curves of a run, as PNG files.

Reads ``RUN_DIR/metrics.csv`` (and ``RUN_DIR/eval.json`` when ``lpjepa.eval`` wrote one)
and writes ``loss.png``, ``accuracy.png`` and ``sparsity.png`` into ``RUN_DIR`` (or
``--out``). Columns a run did not log (epochs without evaluation) are skipped. A bad
argument ends in one line, ``python -m lpjepa.plot: error: ...``, and exit code 2.
"""
from .training.cli import ArgumentParser, usage_errors
from .training.plot import plot_run


def main(argv=None):
    parser = ArgumentParser(prog="python -m lpjepa.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder written by lpjepa.train (its --out)")
    parser.add_argument("--out", help="folder for the PNGs (default: the run folder; created if missing)")
    args = parser.parse_args(argv)
    with usage_errors(parser):
        paths = plot_run(args.run_dir, args.out)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
