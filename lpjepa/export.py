"""``python -m lpjepa.export RUN --out FILE``: a run's backbone as a safetensors file timm loads (console script ``lpjepa-export``).

Writes the backbone of ``RUN`` (a run folder, whose finished model ``checkpoints/final.pt``
is read, or ``checkpoints/last.pt`` while the run has not finished; or any checkpoint file
``lpjepa.train`` wrote) to ``FILE`` and its projector to ``--projector-out`` (default
``FILE`` with ``-projector`` before ``.safetensors``), says which checkpoint and epoch it
read, then prints the lines that load the backbone with timm. The folders of both files
must exist. A bad argument ends in one line, ``python -m lpjepa.export: error: ...``, and
exit code 2.
"""
from .training.checkpoint import describe_checkpoint, evaluated_checkpoint_path, load_checkpoint
from .training.cli import ArgumentParser, UsageError, require_existing_folder, usage_errors
from .training.export import SUFFIX, export_checkpoint, loading_code


def build_parser():
    parser = ArgumentParser(
        prog="python -m lpjepa.export",
        description="Write a run's pretrained backbone (and its projector, separately) as safetensors files.",
    )
    parser.add_argument("run", help="a run folder written by lpjepa.train (uses checkpoints/final.pt; checkpoints/last.pt for a run "
                                             "that has not finished), or a checkpoint .pt")
    parser.add_argument("--out", required=True, help=f"the backbone's file; its name ends in {SUFFIX} (timm reads the format from it)")
    parser.add_argument("--projector-out", help=f"the projector's file (default: --out with -projector before {SUFFIX})")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        for name, path in (("--out", args.out), ("--projector-out", args.projector_out)):
            if path is None:
                continue
            if not path.endswith(SUFFIX):
                raise UsageError(f"argument {name}: invalid value {path}: the name must end in {SUFFIX}")
            require_existing_folder(name, path)
        if args.projector_out is not None and args.projector_out == args.out:
            raise UsageError("argument --projector-out: must differ from --out")
        file = evaluated_checkpoint_path(args.run)
        checkpoint = load_checkpoint(file)
        backbone_file, projector_file = export_checkpoint(checkpoint, args.out, args.projector_out)
    cfg = checkpoint["config"]
    print(f"from {describe_checkpoint(file, checkpoint)}")
    print(f"backbone ({cfg['backbone']}, {cfg['stem']} stem, epoch {checkpoint['epoch']}): {backbone_file}")
    print(f"projector: {projector_file}")
    print("load the backbone with timm:")
    print(loading_code(cfg["backbone"], cfg["stem"], backbone_file, cfg.get("stem_padding", 1)))


if __name__ == "__main__":
    main()
