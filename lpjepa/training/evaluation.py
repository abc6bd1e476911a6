"""Evaluation of frozen features: kNN, linear probes, sparsity.

Every epoch the training loop calls ``evaluate_online`` (the online probes it trains,
kNN, sparsity); ``evaluate_checkpoint`` is the offline evaluation of
``python -m lpjepa.eval``: frozen backbone and projector features of the train and
validation splits (no augmentation), a linear probe trained on each, kNN on the
backbone features.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import metrics, rgg
from . import data
from .checkpoint import evaluated_checkpoint_path, load_model_for_eval
from .speed import AMP_DTYPES

# Floor of a feature's standard deviation in the offline probe's standardisation: a
# dead unit (always 0) would otherwise divide by zero.
MIN_FEATURE_STD = 1e-6


@torch.no_grad()
def extract_features(model, loader, device, amp=False, amp_dtype=torch.float16):
    """(backbone features, projector outputs, labels) of a loader, as float32 CPU tensors; ``amp``: autocast to ``amp_dtype``.

    ``model`` is an ``lpjepa.training.model.LpJEPA`` (not the DDP wrapper); it runs in eval mode
    and is put back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    hs, zs, ys = [], [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            h, z = model.features(x)
        hs.append(h.float().cpu())
        zs.append(z.float().cpu())
        ys.append(y)
    model.train(was_training)
    return torch.cat(hs), torch.cat(zs), torch.cat(ys)


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Fraction of rows whose label is among the k highest scores, for each k (k capped at the class count)."""
    out = []
    for k in ks:
        k = min(k, scores.shape[1])
        top = scores.topk(k, dim=1).indices
        out.append((top == labels[:, None]).any(dim=1).float().mean().item())
    return out


@torch.no_grad()
def knn_scores(train_features, train_labels, test_features, num_classes, k=200, temperature=0.07, chunk=1024):
    """Class scores of a weighted kNN on cosine similarity (InstDisc / solo-learn style).

    Features are L2-normalised; each test point's k nearest train points vote for their
    class with weight exp(similarity / temperature). Returns (N_test, num_classes).
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def capped_knn_k(k, train_labels):
    """``k``, at most the smallest class's number of training points: more neighbours than a class has
    outvote it by the other classes' nearest points however good the features are."""
    return min(k, data.smallest_class_count(train_labels))


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=200, temperature=0.07):
    """(top-1, top-5) of the weighted cosine kNN."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels)


class OnlineProbes(nn.Module):
    """Linear classifiers on detached backbone features and detached projector outputs.

    Trained every step on the training views with their own optimizer (as in solo-learn),
    so they never send a gradient into the model.
    """

    def __init__(self, feature_dim, projector_dim, num_classes):
        super().__init__()
        self.backbone = nn.Linear(feature_dim, num_classes)
        self.projector = nn.Linear(projector_dim, num_classes)

    def forward(self, h, z, y):
        """Summed cross-entropy of both probes on detached float32 inputs."""
        return F.cross_entropy(self.backbone(h.detach().float()), y) + F.cross_entropy(
            self.projector(z.detach().float()), y
        )

    @torch.no_grad()
    def accuracy(self, h, z, y):
        """{'probe_backbone_top1', ..._top5, 'probe_projector_top1', ..._top5} on given features."""
        device = self.backbone.weight.device
        y = y.to(device)
        b1, b5 = topk_accuracy(self.backbone(h.to(device)), y)
        p1, p5 = topk_accuracy(self.projector(z.to(device)), y)
        return {"probe_backbone_top1": b1, "probe_backbone_top5": b5, "probe_projector_top1": p1, "probe_projector_top5": p5}


def sparsity_metrics(z, cfg):
    """The projector output's sparsity (lpjepa.metrics) next to the prior's predicted zero fraction.

    The prior is the run's (``cfg``: p, mu, sigma, target_law); a dense target has no zeros.
    """
    report = metrics.sparsity_report(z)
    rectify = cfg.get("target_law", cfg.get("target", "rectified")) == "rectified"  # "target": a config from before the rename
    return {
        "val_zero_fraction": report["zero_fraction"],
        "val_l0": report["l0"],
        "val_l1": report["l1"],
        "val_dead_units": report["dead_units"],
        "val_dead_fraction": report["dead_units"] / z.shape[1],
        "prior_zero_fraction": rgg.expected_zero_fraction(cfg["p"], cfg["mu"], cfg.get("sigma"), rectify=rectify),
    }


def train_linear_probe(train_x, train_y, num_classes, *, epochs=100, lr=1e-3, weight_decay=0.0, batch_size=512, device="cpu", seed=0):
    """A linear classifier trained offline on frozen features (AdamW, cosine schedule, standardised inputs).

    Returns a function mapping features to class scores.
    """
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(MIN_FEATURE_STD)
    x = ((train_x - mean) / std).to(device)
    y = train_y.to(device)
    probe = nn.Linear(x.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(device)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()

    @torch.no_grad()
    def predict(features):
        return probe(((features - mean) / std).to(device)).cpu()

    return predict


# The metrics.csv column of the paper's CIFAR-100 number (its Table 2): the validation top-1 of solo-learn's
# online linear classifier on the backbone features (val_acc1 in the official run's log). Written only when
# the backbone probe is that classifier (``is_official_classifier``); empty otherwise.
OFFICIAL_TOP1 = "online_linear_top1"


def is_official_classifier(cfg):
    """Whether the backbone probe is trained as the official run trains its online classifier (LARS, scaled lr)."""
    return cfg.get("probe_optimizer") == "lars" and cfg.get("lr_scaling") == "linear"


def evaluate_online(model, probes, knn_loader, val_loader, n_classes, device, amp, cfg):
    """Online probe accuracy, kNN on backbone features and sparsity of the projector output, on the validation split."""
    amp_dtype = AMP_DTYPES[cfg.get("amp_dtype", "fp16")]
    train_h, _, train_y = extract_features(model, knn_loader, device, amp, amp_dtype)
    train_h, train_y = train_h.to(device), train_y.to(device)  # the projector outputs are not needed on the device
    val_h, val_z, val_y = extract_features(model, val_loader, device, amp, amp_dtype)
    probes.eval()
    result = probes.accuracy(val_h, val_z, val_y)
    probes.train()
    if is_official_classifier(cfg):
        result[OFFICIAL_TOP1] = result["probe_backbone_top1"]
    k = capped_knn_k(cfg["knn_k"], train_y)
    result["knn_top1"], result["knn_top5"] = knn_accuracy(
        train_h, train_y, val_h.to(device), val_y.to(device), n_classes, k, cfg["knn_t"]
    )
    result.update(sparsity_metrics(val_z, cfg))
    return result


def evaluate_checkpoint(checkpoint, *, data_dir=None, val_dir=None, device="auto", num_workers=None,
                        batch_size=512, probe_epochs=100, probe_lr=1e-3, knn_k=None, knn_t=None, download=None,
                        loaded=None):
    """Offline linear probes and kNN on frozen features of a checkpoint; returns a dict of results.

    Top-1 and top-5 accuracies; top-5 only with more than 5 classes (with fewer it is 100%).

    ``checkpoint``: a checkpoint file, or a run folder (its ``final.pt``, else its ``last.pt``);
    ``loaded``: that file's dict when the caller has already loaded it.
    """
    checkpoint = evaluated_checkpoint_path(checkpoint)
    model, cfg, dev = load_model_for_eval(checkpoint if loaded is None else loaded, device)
    overrides = {"data_dir": data_dir, "val_dir": val_dir, "num_workers": num_workers, "download": download}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    train_split, val_split = data.run_splits(cfg)
    train_loader, val_loader = data.eval_loaders(cfg, train_split, val_split, batch_size, pin_memory=dev.type == "cuda")
    n_classes = data.num_classes(train_split)
    amp, amp_dtype = dev.type == "cuda" and cfg["amp"], AMP_DTYPES[cfg.get("amp_dtype", "fp16")]
    train_h, train_z, train_y = extract_features(model, train_loader, dev, amp, amp_dtype)
    val_h, val_z, val_y = extract_features(model, val_loader, dev, amp, amp_dtype)
    results = {"checkpoint": os.path.abspath(checkpoint), "epoch": cfg.get("_epoch"), "num_classes": n_classes}
    for name, tr, va in (("backbone", train_h, val_h), ("projector", train_z, val_z)):
        predict = train_linear_probe(tr, train_y, n_classes, epochs=probe_epochs, lr=probe_lr, device=dev, seed=cfg["seed"])
        top1, top5 = topk_accuracy(predict(va), val_y)
        results[f"linear_{name}_top1"], results[f"linear_{name}_top5"] = top1, top5
    asked = knn_k if knn_k is not None else cfg["knn_k"]
    k, t = capped_knn_k(asked, train_y), knn_t if knn_t is not None else cfg["knn_t"]
    if k < asked:
        print(f"note: --knn-k {asked} is more than the {k} training images of the smallest class; kNN uses k = {k}", flush=True)
    on_device = (x.to(dev) for x in (train_h, train_y, val_h, val_y))
    results["knn_top1"], results["knn_top5"] = knn_accuracy(*on_device, n_classes, k, t)
    results["knn_k"] = k
    results.update(sparsity_metrics(val_z, cfg))
    # Top-5 of 5 classes or fewer is 100% by definition: it would only take a line of the output.
    return {key: value for key, value in results.items() if not (key.endswith("_top5") and n_classes <= 5)}
