"""The variance of the RDMReg loss and of its gradient under each direction scheme, at equal K.

    python -m benchmarks.directions [--quick] [--draws N] [--out DIR] [--threads N]

For each dim D, number of directions K and scheme ('gaussian', 'orthogonal', 'svd',
'svd-bottom-half'; ``lpjepa.loss.draw_directions``), ``--draws`` independent draws of the
directions each evaluate ``lpjepa.rdmreg_loss`` (torch backend, fp32) and its gradient in
the features, on two feature batches (B = 256):

* ``rgg``: samples of the seed's prior (p = 1, mu = 0), the target's own law;
* ``trained``: the outputs of a small MLP (ending in a ReLU, like the seed's projector)
  trained for a few hundred steps with ``rectified_lpjepa_loss`` on generated two-view
  data (Gaussian clusters plus noise).

Each draw is scored against a target batch fixed for all draws ("directions": the
variance the scheme itself adds) and against a fresh target ("step": what a training
step sees, directions and target both fresh). Reported per cell: the mean loss, the
standard deviation of the loss, and the relative variance of the gradient,
E||g - E g||^2 / ||E g||^2 (unbiased over the draws). Then, for each scheme, the K at
which its loss standard deviation and its gradient variance equal the Gaussian scheme's
at the reference Ks (256 and 8192), interpolated log-log between the measured Ks
("< 64" or "> 8192" outside them).

The SVD schemes depend on the batch: at K up to the singular vectors they keep they
draw nothing, so their "directions" variance is 0, and their mean loss is not the
Gaussian scheme's (another estimator, not a cheaper one of the same number); the table
shows both. Writes ``directions.md`` and ``directions.json`` to ``--out``.
"""
import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import lpjepa
from lpjepa._checks import DIRECTION_SCHEMES
from lpjepa.ops import directions as direction_ops
from lpjepa.ops import sliced_wasserstein as torch_ops

FULL = dict(dims=(512, 2048), ks=(64, 256, 1024, 8192), batch=256, draws=200, train_steps=300, reference_ks=(256, 8192))
# Tiny sizes for CI: that the study runs, not what it finds.
QUICK = dict(dims=(16, 32), ks=(4, 8, 16, 64), batch=32, draws=12, train_steps=10, reference_ks=(8, 64))
P, MU = 1.0, 0.0  # the seed's prior
SETTINGS = ("directions", "step")
FEATURES = ("rgg", "trained")
# The trained features: a 2-layer MLP on INPUT_DIM-dim Gaussian clusters, views = point + VIEW_NOISE noise.
INPUT_DIM, HIDDEN, CLUSTERS, CLUSTER_SPREAD, VIEW_NOISE, LEARNING_RATE = 32, 512, 16, 2.0, 0.3, 1e-3


def trained_features(dim, batch, steps, seed):
    """(batch, dim) outputs of a small MLP trained ``steps`` steps with the seed's objective on generated views."""
    gen = torch.Generator().manual_seed(seed)
    centres = CLUSTER_SPREAD * torch.randn(CLUSTERS, INPUT_DIM, generator=gen)

    def points():
        return centres[torch.randint(CLUSTERS, (batch,), generator=gen)] + torch.randn(batch, INPUT_DIM, generator=gen)

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(INPUT_DIM, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, dim), nn.ReLU())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    for _ in range(steps):
        x = points()
        views = [model(x + VIEW_NOISE * torch.randn(x.shape, generator=gen)) for _ in range(2)]
        loss = lpjepa.rectified_lpjepa_loss(*views, p=P, mu=MU, generator=gen, backend="torch").loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return model(points())


class Moments:
    """Running sums over draws: the loss's mean and standard deviation, the gradient's relative variance."""

    def __init__(self):
        self.count, self.losses, self.grad_sum, self.grad_square = 0, [], None, 0.0

    def add(self, loss, grad):
        grad = grad.double().flatten()
        self.count += 1
        self.losses.append(float(loss))
        self.grad_sum = grad if self.grad_sum is None else self.grad_sum + grad
        self.grad_square += float(grad.dot(grad))

    def summary(self):
        n = self.count
        mean = sum(self.losses) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.losses) / (n - 1))
        mean_grad_square = float(self.grad_sum.dot(self.grad_sum)) / n**2
        spread = max(self.grad_square - n * mean_grad_square, 0.0) / (n - 1)
        return dict(mean_loss=mean, loss_std=std, grad_rel_var=spread / mean_grad_square)


def _loss_and_grads(features, targets, projections):
    """[(loss, gradient in the features)] against each target: rdmreg_loss's value and gradient, sharing the projections.

    The features' projections are made once for all targets; the loss and the residual
    come from the torch body's sort and residual (those of ``rdmreg_loss``), and the
    gradient in the features is the op's formula, 2 / numel * residual^T @ P.
    """
    proj = project(features, projections)
    out = []
    for target in targets:
        loss, residual, _ = torch_ops.torch_sort_residual(proj, target, False)
        out.append((loss, 2.0 / residual.numel() * residual[0].T @ projections))
    return out


def project(x, projections):
    """(1, K, B) projections of the (B, D) rows ``x``, in the loss's compute dtype (the torch body's)."""
    return torch_ops.torch_project([x[None]], projections, torch_ops.compute_dtype(x, projections))


def _draw(scheme, num_projections, dim, singular, generator):
    """One draw of (K, D) directions; ``singular``: the batch's (1, r, D) singular vectors for the SVD schemes."""
    if scheme == "gaussian":
        return direction_ops.random_projections(num_projections, dim, generator=generator)
    if scheme == "orthogonal":
        return direction_ops.orthogonal_projections(num_projections, dim, generator=generator)
    return direction_ops.svd_projections(singular, num_projections, scheme == "svd-bottom-half", generator=generator)[0]


def measure_cell(features, fixed_target, scheme, num_projections, draws, seed):
    """{(feature name, setting): summary} of ``draws`` draws of one scheme at one K."""
    generator = torch.Generator().manual_seed(seed)
    dim, batch = fixed_target.shape[1], fixed_target.shape[0]
    singular = {name: direction_ops.centred_right_singular_vectors(z[None]) for name, z in features.items()}
    moments = {(name, setting): Moments() for name in features for setting in SETTINGS}
    shared, projected_targets = None, None
    for _ in range(draws):
        fresh_target = lpjepa.sample_rgg((batch, dim), P, MU, generator=generator, backend="torch")
        if not scheme.startswith("svd"):  # one draw for both feature batches, its targets projected once
            shared = _draw(scheme, num_projections, dim, None, generator)
            projected_targets = [project(t, shared) for t in (fixed_target, fresh_target)]
        for name, z in features.items():
            projections, targets = shared, projected_targets
            if projections is None:
                projections = _draw(scheme, num_projections, dim, singular[name], generator)
                targets = [project(t, projections) for t in (fixed_target, fresh_target)]
            for setting, result in zip(SETTINGS, _loss_and_grads(z, targets, projections)):
                moments[(name, setting)].add(*result)
    return {key: m.summary() for key, m in moments.items()}


def matching_k(values, ks, target):
    """The K at which a scheme's decreasing ``values`` (one per K in ``ks``) reach ``target``, log-log interpolated."""
    if values[0] <= target:
        return f"<= {ks[0]}"
    for (k_lo, v_lo), (k_hi, v_hi) in zip(zip(ks, values), zip(ks[1:], values[1:])):
        if v_hi <= target:
            if v_hi <= 0:
                return f"<= {k_hi}"
            fraction = (math.log(target) - math.log(v_lo)) / (math.log(v_hi) - math.log(v_lo))
            return f"{math.exp(math.log(k_lo) + fraction * (math.log(k_hi) - math.log(k_lo))):.0f}"
    return f"> {ks[-1]}"


def run(config, progress=True):
    """Every cell of the study: a list of row dicts (dim, features, K, scheme, setting and the summary)."""
    cells = [(d, k, s) for d in config["dims"] for k in config["ks"] for s in DIRECTION_SCHEMES]
    rows, bar = [], tqdm(total=len(cells), disable=not progress, desc="directions study")
    for dim in config["dims"]:
        gen = torch.Generator().manual_seed(dim)
        features = {
            "rgg": lpjepa.sample_rgg((config["batch"], dim), P, MU, generator=gen, backend="torch"),
            "trained": trained_features(dim, config["batch"], config["train_steps"], seed=dim),
        }
        fixed_target = lpjepa.sample_rgg((config["batch"], dim), P, MU, generator=gen, backend="torch")
        for k in config["ks"]:
            for index, scheme in enumerate(DIRECTION_SCHEMES):
                bar.set_postfix(D=dim, K=k, scheme=scheme)
                cell = measure_cell(features, fixed_target, scheme, k, config["draws"], seed=dim * 100_003 + k * 10 + index)
                rows += [dict(dim=dim, features=name, k=k, scheme=scheme, setting=setting, **summary)
                         for (name, setting), summary in cell.items()]
                bar.update(1)
    bar.close()
    return rows


def matching_rows(rows, config):
    """For each (D, features, setting, scheme): the K matching the Gaussian scheme at each reference K."""
    out = []
    ks = list(config["ks"])
    for dim in config["dims"]:
        for name in FEATURES:
            for setting in SETTINGS:
                cell = {(r["scheme"], r["k"]): r for r in rows
                        if r["dim"] == dim and r["features"] == name and r["setting"] == setting}
                for scheme in DIRECTION_SCHEMES:
                    match = dict(dim=dim, features=name, setting=setting, scheme=scheme)
                    for metric in ("loss_std", "grad_rel_var"):
                        values = [cell[(scheme, k)][metric] for k in ks]
                        for ref in config["reference_ks"]:
                            target = cell[("gaussian", ref)][metric]
                            # The Gaussian scheme matches itself at ref, whatever the noise between its Ks.
                            match[f"{metric}@{ref}"] = str(ref) if scheme == "gaussian" else matching_k(values, ks, target)
                    out.append(match)
    return out


def markdown(rows, matches, config):
    """The two tables: every cell, then the K each scheme needs."""
    lines = [
        "| D | features | K | scheme | mean loss | loss std (directions) | grad rel. var (directions) "
        "| loss std (step) | grad rel. var (step) |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    by_cell = {(r["dim"], r["features"], r["k"], r["scheme"], r["setting"]): r for r in rows}
    for dim in config["dims"]:
        for name in FEATURES:
            for k in config["ks"]:
                for scheme in DIRECTION_SCHEMES:
                    d, s = by_cell[(dim, name, k, scheme, "directions")], by_cell[(dim, name, k, scheme, "step")]
                    lines.append(
                        f"| {dim} | {name} | {k} | {scheme} | {d['mean_loss']:.4g} | {d['loss_std']:.3g} "
                        f"| {d['grad_rel_var']:.3g} | {s['loss_std']:.3g} | {s['grad_rel_var']:.3g} |"
                    )
    refs = config["reference_ks"]
    header = " | ".join(f"K for {m} of gaussian@{r}" for m in ("loss std", "grad var") for r in refs)
    lines += ["", f"| D | features | setting | scheme | {header} |", "|---:|---|---|---|" + "---:|" * 2 * len(refs)]
    for m in matches:
        cells = " | ".join(m[f"{metric}@{r}"] for metric in ("loss_std", "grad_rel_var") for r in refs)
        lines.append(f"| {m['dim']} | {m['features']} | {m['setting']} | {m['scheme']} | {cells} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.directions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few draws (CI: that it runs)")
    parser.add_argument("--draws", type=int, help="draws per cell (default 200, --quick 12)")
    parser.add_argument("--out", default="bench_out", help="folder for directions.md and directions.json")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.draws is not None and args.draws < 2:
        parser.error(f"--draws must be at least 2 (a variance needs two draws); got {args.draws}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = dict(QUICK if args.quick else FULL)
    if args.draws:
        config["draws"] = args.draws
    started = time.time()
    rows = run(config, progress=not args.no_progress)
    matches = matching_rows(rows, config)
    table = markdown(rows, matches, config)
    elapsed = time.time() - started
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, torch threads: "
               f"{torch.get_num_threads()}, {config['draws']} draws per cell, {elapsed / 60:.1f} min")
    print(table + f"\n\n{machine}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "directions.md").write_text(table + f"\n\n{machine}\n")
    (out / "directions.json").write_text(json.dumps(dict(config=config, rows=rows, matches=matches, machine=machine), indent=1))


if __name__ == "__main__":
    main()
