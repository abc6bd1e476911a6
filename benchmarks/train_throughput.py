"""Training throughput: images per second of the data paths alone and of whole training steps.

    python -m benchmarks.train_throughput [--device cpu|cuda] [--quick] [--cores N] [--out bench_out/throughput]

(a) **Data path**, per augmentation recipe: the PIL pipeline (``DataLoader`` workers, one
per core, each view augmented in PIL) against the device-resident one (the uint8 split on
the device, both views of a batch augmented there in a few tensor ops). On the CPU both
get the same cores: ``--cores`` worker processes of one thread each, making images with
PIL or whole batches with tensor ops. (b) **Training steps** at the seed recipe (ResNet-18, CIFAR stem,
AdamW, 256 projections) fed by each path, in each ``--variants`` of the speed switches,
with a sync only at the end of each timed run. An image is one image, two views.

The images are CIFAR-shaped (32x32 RGB, uint8, random), or CIFAR-100's train split with
``--data-dir``. Prints a Markdown table and writes ``table.md`` and ``results.json`` to ``--out``.
``--quick`` runs tiny sizes (a ResNet-10t on 16x16 images, a few batches and steps): that
the program works, in seconds on the CPU, not what it measures.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lpjepa.training.config import DEFAULTS
from lpjepa.training.data import AUGMENTATIONS, EpochSampler, TwoViewDataset, load_cifar, make_loader, train_transform
from lpjepa.training.device_data import DeviceTwoViewLoader, device_images
from lpjepa.training.gpu_augment import BatchAugment
from lpjepa.training.loop import TrainState

from .cases import synchronize
from .report import machine

# The CPU target of the throughput issue: the batched path's images/s over the PIL pipeline's, same cores.
CPU_DATA_TARGET = 3.0
# The GPU goal: one CIFAR-100 epoch of the seed recipe (50,000 images, two views each) in this many seconds.
EPOCH_IMAGES, EPOCH_GOAL_S = 50_000, 10.0
CIFAR100_CLASSES = 100
# Batches a DataLoader worker prepares ahead (DataLoader's prefetch_factor default).
PREFETCH_PER_WORKER = 2
# Speed-switch variants of the training steps (config overrides); each switch is a no-op on the CPU.
VARIANTS = {
    "plain": {"channels_last": False, "fused_optimizer": False, "cudnn_benchmark": False},
    "default": {},
    "bf16": {"amp_dtype": "bf16"},
    "compile": {"compile": True},
}
# The defaults of the sizes, full and --quick (given options win over both). The training part's
# steps, warm-up, batch and variants also depend on the device (parse_args).
FULL = dict(batch_size=256, images=10_000, recipes="seed,paper", batches=10, rounds=3, backbone="resnet18", image_size=32)
QUICK = dict(batch_size=8, images=32, recipes="seed", batches=2, rounds=1, backbone="resnet10t", image_size=16,
             steps=1, warmup_steps=1, train_batch_size=4)


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few batches and steps (seconds on the CPU: that it runs); the defaults "
                        "marked --quick below, which given options override")
    parser.add_argument("--cores", type=int, default=available_cores(), help="PIL workers and CPU torch threads (default: all)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default 256, the seed's; --quick 8)")
    parser.add_argument("--images", type=int, help="size of the generated dataset (default 10000, --quick 32)")
    parser.add_argument("--data-dir", help="use CIFAR-100's train split from this folder instead of generated images")
    parser.add_argument("--recipes", help="augmentation recipes of the data part (default seed,paper; --quick seed)")
    parser.add_argument("--batches", type=int, help="timed batches per round of the data part (default 10, --quick 2)")
    parser.add_argument("--rounds", type=int, help="timed rounds of the data part; the median counts (default 3, --quick 1)")
    parser.add_argument("--backbone", help="timm backbone (default resnet18, --quick resnet10t)")
    parser.add_argument("--image-size", type=int, help="image side (default 32, --quick 16)")
    parser.add_argument("--steps", type=int,
                        help="timed training steps per run (default 30 on CUDA, 2 on the CPU, --quick 1; 0: none)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default 5 on CUDA, 1 on the CPU and --quick)")
    parser.add_argument("--train-batch-size", type=int,
                        help="batch of the training part (default --batch-size on CUDA, 32 on the CPU, --quick 4)")
    parser.add_argument("--variants", help=f"speed-switch variants of the training part, from {', '.join(VARIANTS)} "
                        "(default plain,default,bf16 on CUDA, default on the CPU)")
    parser.add_argument("--out", default="bench_out/throughput", help="folder for table.md and results.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda, but torch sees no CUDA device")
    on_cuda = args.device == "cuda"
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.steps = args.steps if args.steps is not None else (30 if on_cuda else 2)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (5 if on_cuda else 1)
    args.train_batch_size = args.train_batch_size or (args.batch_size if on_cuda else 32)
    args.recipes = args.recipes.split(",")
    args.variants = (args.variants or ("plain,default,bf16" if on_cuda else "default")).split(",")
    for name, values, allowed in (("--recipes", args.recipes, AUGMENTATIONS), ("--variants", args.variants, VARIANTS)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    for name in ("cores", "batch_size", "images", "batches", "rounds", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.images < max(args.batch_size, args.train_batch_size):
        parser.error("--images must hold at least one batch")
    return args


class GeneratedCIFAR(Dataset):
    """CIFAR-shaped random images held as torchvision's CIFAR classes hold them: ``data`` (N, 32, 32, 3) uint8, ``targets``."""

    def __init__(self, n, size=32, classes=CIFAR100_CLASSES, seed=0):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        self.targets = (np.arange(n) % classes).tolist()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return Image.fromarray(self.data[index]), self.targets[index]


def pil_batches(dataset, recipe, args, device, batch_size=None):
    """Endless two-view batches from PIL workers (epoch after epoch), moved to ``device`` as training would."""
    views = TwoViewDataset(dataset, train_transform(recipe, args.image_size, "cifar100"))
    sampler = EpochSampler(views)
    loader = make_loader(views, batch_size or args.batch_size, num_workers=args.cores, pin_memory=device.type == "cuda",
                         sampler=sampler, drop_last=True)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        for x1, x2, y in loader:
            yield tuple(t.to(device, non_blocking=True) for t in (x1, x2, y))


def device_batches(dataset, recipe, args, device, batch_size=None):
    """Endless two-view batches of the device-resident path."""
    images, labels = device_images(dataset, device)
    sampler = EpochSampler(dataset)
    # On the CPU the batches are made in --cores worker processes, as the PIL pipeline's images are.
    loader = DeviceTwoViewLoader(images, labels, sampler, batch_size or args.batch_size,
                                 BatchAugment(recipe, args.image_size, "cifar100"), num_workers=args.cores)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def time_batches(batches, count, device):
    """Seconds to draw ``count`` batches, the device's queue included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        last = next(batches)
    last[0].sum().item()  # waits for the last batch (and so for every one before it) on the device
    synchronize(device)
    return time.perf_counter() - start


def warmup_batches(path, args, device):
    """Batches drawn untimed before a timed run: the workers' prefetched backlog (2 per worker) and one more.

    Both paths have workers on the CPU; on CUDA the device batches are made in the main process.
    """
    with_workers = path == "PIL workers" or device.type == "cpu"
    return PREFETCH_PER_WORKER * args.cores + 1 if with_workers else 1


def measure_data(dataset, args, device, log):
    """Images/s of each data path per recipe. The paths alternate round by round, so that both see the same
    load on a shared machine; each round starts a fresh pipeline and skips its warm-up. The median round counts."""
    rows = []
    paths = {"PIL workers": pil_batches, "device batches": device_batches}
    for recipe in args.recipes:
        seconds = {path: [] for path in paths}
        for _ in range(args.rounds):
            for path, make in paths.items():
                batches = make(dataset, recipe, args, device)
                time_batches(batches, warmup_batches(path, args, device), device)
                seconds[path].append(time_batches(batches, args.batches, device))
                batches.close()  # ends the workers before the other path runs
        rates = {}
        for path in paths:
            median = statistics.median(seconds[path])
            rates[path] = args.batches * args.batch_size / median
            rows.append({"part": "data", "recipe": recipe, "path": path, "variant": "", "images_per_s": rates[path],
                         "ms_per_batch": 1000 * median / args.batches})
            log(f"  data {recipe:<5} {path:<15} {rates[path]:8.0f} images/s")
        rows[-1]["speedup"] = rates["device batches"] / rates["PIL workers"]
    return rows


def train_config(args, device, variant):
    cfg = dict(DEFAULTS, backbone=args.backbone, batch_size=args.train_batch_size, device=str(device),
               image_size=args.image_size, num_workers=args.cores)
    return dict(cfg, **VARIANTS[variant])


def measure_training(dataset, args, device, log):
    """Images/s of whole training steps (model, loss, optimizer, probes) per data path and speed variant."""
    rows = []
    for variant in args.variants:
        for path in ("PIL workers", "device batches"):
            cfg = train_config(args, device, variant)
            torch.backends.cudnn.benchmark = False  # each variant sets its own
            torch.manual_seed(0)
            state = TrainState(cfg, device, CIFAR100_CLASSES, steps_per_epoch=len(dataset) // args.train_batch_size)
            make = pil_batches if path == "PIL workers" else device_batches
            batches = make(dataset, "seed", args, device, args.train_batch_size)
            warmup = max(args.warmup_steps, warmup_batches(path, args, device))
            start = time.perf_counter()
            run_steps(state, batches, warmup)  # its loss read at the end waits for the warm-up steps
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            total = run_steps(state, batches, args.steps)
            seconds = time.perf_counter() - start
            batches.close()
            rate = args.steps * args.train_batch_size / seconds
            rows.append({"part": "training step", "recipe": "seed", "path": path, "variant": variant, "images_per_s": rate,
                         "ms_per_batch": 1000 * seconds / args.steps, "epoch_s": EPOCH_IMAGES / rate,
                         "warmup_s": first_s, "loss": total})
            log(f"  step {variant:<8} {path:<15} {rate:8.0f} images/s ({warmup} warm-up steps {first_s:.1f} s)")
    return rows


def run_steps(state, batches, steps):
    """``steps`` training steps; the loss sum is read once at the end, which waits for them all. Returns it."""
    total = None
    for _ in range(steps):
        values, _ = state.step(*next(batches))
        total = values[0] if total is None else total + values[0]
    return float(total) if total is not None else None


def markdown_table(rows):
    head = "| part | recipe | data path | variant | images/s | ms / batch | vs PIL | CIFAR epoch (s) |\n|---|---|---|---|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        speedup = f"{r['speedup']:.1f}x" if "speedup" in r else ""
        epoch = f"{r['epoch_s']:.1f}" if "epoch_s" in r else ""
        lines.append(f"| {r['part']} | {r['recipe']} | {r['path']} | {r['variant']} | {r['images_per_s']:.0f} | "
                     f"{r['ms_per_batch']:.1f} | {speedup} | {epoch} |")
    return "\n".join(lines)


def target_lines(rows, device):
    lines = []
    for r in rows:
        if "speedup" in r and device.type == "cpu":
            verdict = "met" if r["speedup"] >= CPU_DATA_TARGET else "MISSED"
            lines.append(f"- {r['recipe']} recipe: device batches {r['speedup']:.1f}x the PIL pipeline's images/s "
                         f"with the same cores (target {CPU_DATA_TARGET:.0f}x): {verdict}")
    steps = [r for r in rows if r["part"] == "training step" and r["path"] == "device batches"]
    if steps and device.type == "cuda":
        best = min(steps, key=lambda r: r["epoch_s"])
        verdict = "met" if best["epoch_s"] < EPOCH_GOAL_S else "MISSED"
        lines.append(f"- CIFAR-100 epoch of the seed recipe: {best['epoch_s']:.1f} s at best ({best['variant']}, "
                     f"device batches; goal under {EPOCH_GOAL_S:.0f} s): {verdict}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.cores)
    info, machine_line = machine(args.device)
    command = "python -m benchmarks.train_throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    dataset = load_cifar("cifar100", args.data_dir, True, download=False) if args.data_dir else GeneratedCIFAR(args.images)
    rows = measure_data(dataset, args, device, log)
    if args.steps > 0:
        rows += measure_training(dataset, args, device, log)
    targets = target_lines(rows, device)
    text = [f"Machine: {machine_line}; {args.cores} cores for the data paths", f"Command: `{command.strip()}`", "",
            markdown_table(rows), ""]
    if targets:
        text += ["Targets:", *targets, ""]
    text = "\n".join(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    meta = dict(device=args.device, quick=args.quick, command=command.strip(), machine=info, cores=args.cores)
    (out / "results.json").write_text(json.dumps(dict(meta, rows=rows), indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
