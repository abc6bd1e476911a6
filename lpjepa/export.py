"""``python -m lpjepa.export RUN --out FILE``: a run's backbone as a safetensors file timm loads (console script ``lpjepa-export``).

Writes the backbone of ``RUN`` (a run folder, whose ``checkpoints/last.pt`` is read, or
any checkpoint file ``lpjepa.train`` wrote, ``final.pt`` included) to ``FILE`` and its
projector to ``--projector-out`` (default ``FILE`` with ``-projector`` before
``.safetensors``), then prints the lines that load the backbone with timm. A bad argument
ends in one line, ``python -m lpjepa.export: error: ...``, and exit code 2.
"""
from .training.checkpoint import checkpoint_path, load_checkpoint
from .training.cli import ArgumentParser, UsageError, usage_errors
from .training.export import SUFFIX, export_checkpoint, loading_code


def build_parser():
    parser = ArgumentParser(
        prog="python -m lpjepa.export",
        description="Write a run's pretrained backbone (and its projector, separately) as safetensors files.",
    )
    parser.add_argument("run", help="a run folder written by lpjepa.train (uses checkpoints/last.pt), or a checkpoint .pt")
    parser.add_argument("--out", required=True, help=f"the backbone's file; its name ends in {SUFFIX} (timm reads the format from it)")
    parser.add_argument("--projector-out", help=f"the projector's file (default: --out with -projector before {SUFFIX})")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        for name, path in (("--out", args.out), ("--projector-out", args.projector_out)):
            if path is not None and not path.endswith(SUFFIX):
                raise UsageError(f"argument {name}: invalid value {path}: the name must end in {SUFFIX}")
        if args.projector_out is not None and args.projector_out == args.out:
            raise UsageError("argument --projector-out: must differ from --out")
        checkpoint = load_checkpoint(checkpoint_path(args.run))
        backbone_file, projector_file = export_checkpoint(checkpoint, args.out, args.projector_out)
    cfg = checkpoint["config"]
    print(f"backbone ({cfg['backbone']}, {cfg['stem']} stem, epoch {checkpoint['epoch']}): {backbone_file}")
    print(f"projector: {projector_file}")
    print("load the backbone with timm:")
    print(loading_code(cfg["backbone"], cfg["stem"], backbone_file, cfg.get("stem_padding", 1)))


if __name__ == "__main__":
    main()
