"""Which implementation (path) of a Triton-backend step runs, chosen by timing them once per GPU and shape.

The sliced-Wasserstein forward has two steps with two paths each (see
``lpjepa.kernels.sliced_wasserstein``): the projection ('triton' or 'cublas') and the sort
and residual ('registers' or 'torch_sort'). Which is faster depends on the GPU, the dtype
and the shape, so the first CUDA call for a (device name, step, dtype, shape bucket) times
every path that can run with CUDA events on the call's own inputs, keeps the fastest, and
reuses it: the package never runs a path slower than the best it has measured there.

* Decisions are kept in memory and in a JSON file, ``paths.json`` in the cache folder
  (``$LPJEPA_CACHE_DIR``, else ``$XDG_CACHE_HOME/lpjepa``, else ``~/.cache/lpjepa``), so a
  later process on the same machine starts with them. ``python -m benchmarks.swd_paths``
  fills it for the benchmark shapes.
* ``LPJEPA_PROJECTION_PATH`` / ``LPJEPA_SORT_PATH`` force a path; ``LPJEPA_AUTOTUNE=0``
  turns the timing off (the cached or default choice is used).
* While ``torch.compile`` traces, under a ``torch.distributed`` process group of more
  than one process (every rank must take the same path, and ranks may see different
  shapes), and off CUDA, nothing is timed: the cached choice is used, else the default.

Shape buckets round every size up to a power of two, so one measurement covers the
batch sizes of a training run.
"""
import json
import os
import statistics

import torch

ENV_CACHE_DIR = "LPJEPA_CACHE_DIR"
ENV_AUTOTUNE = "LPJEPA_AUTOTUNE"
ENV_FORCED = {"projection": "LPJEPA_PROJECTION_PATH", "sort": "LPJEPA_SORT_PATH"}

_CACHE_FILE = "paths.json"
# Calls per timed round and rounds per path; the paths alternate round by round.
_TIMED_CALLS = 3
_ROUNDS = 3


def cache_path():
    """Where the decisions are kept: ``$LPJEPA_CACHE_DIR/paths.json`` or the user cache folder."""
    folder = os.environ.get(ENV_CACHE_DIR)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "lpjepa")
    return os.path.join(folder, _CACHE_FILE)


def bucket(size):
    """A size rounded up to a power of two: the shapes one measurement stands for."""
    return 1 << max(0, int(size) - 1).bit_length()


def cuda_event_timer(run, calls=_TIMED_CALLS):
    """Milliseconds per call of ``run`` over ``calls`` back-to-back calls, from CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


class PathChooser:
    """The path of each step per key: forced, remembered, measured, or the default.

    ``timer(run) -> ms`` times one path (CUDA events by default; tests pass a fake).
    ``cache_file`` None: ``cache_path()`` at first use.
    """

    def __init__(self, timer=cuda_event_timer, cache_file=None):
        self.timer = timer
        self.cache_file = cache_file
        self.decisions = None  # {key: path}, loaded at first use
        self.measured = {}  # {key: {path: ms}} of this process, for reports

    def _load(self):
        if self.decisions is None:
            self.cache_file = self.cache_file or cache_path()
            try:
                with open(self.cache_file) as f:
                    self.decisions = dict(json.load(f))
            except (OSError, ValueError, TypeError):
                self.decisions = {}
        return self.decisions

    def _save(self):
        try:
            os.makedirs(os.path.dirname(self.cache_file), exist_ok=True)
            tmp = f"{self.cache_file}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.decisions, f, indent=1, sort_keys=True)
            os.replace(tmp, self.cache_file)
        except OSError:
            pass  # a read-only home: the decision still holds for this process

    def forget(self):
        """Drops every remembered decision: the next calls measure again, and rewrite the file as they do."""
        self._load().clear()

    def choose(self, step, key, candidates, default, run, may_time):
        """The path for ``step`` ('projection' or 'sort') at ``key`` (a string).

        candidates: the paths that can run this call; default: the choice without a
        measurement; run(path): one call of that path on this call's inputs; may_time:
        whether timing is allowed now (see the module doc).
        """
        forced = os.environ.get(ENV_FORCED[step])
        if forced:
            if forced not in candidates:
                raise ValueError(f"{ENV_FORCED[step]}={forced!r} cannot run this call; it takes one of {candidates}")
            return forced
        decisions = self._load()
        full_key = f"{step}|{key}"
        if decisions.get(full_key) in candidates:
            return decisions[full_key]
        if not may_time or len(candidates) == 1 or os.environ.get(ENV_AUTOTUNE) == "0":
            return default
        for path in candidates:  # warm: compiles each path's kernels once
            run(path)
        times = {path: [] for path in candidates}
        for round_ in range(_ROUNDS):
            order = candidates if round_ % 2 == 0 else candidates[::-1]
            for path in order:
                times[path].append(self.timer(lambda: run(path)))
        medians = {path: statistics.median(ms) for path, ms in times.items()}
        best = min(candidates, key=medians.__getitem__)
        self.measured[full_key] = medians
        decisions[full_key] = best
        self._save()
        return best


CHOOSER = PathChooser()


def may_time(*tensors):
    """Whether a path may be timed now: eager CUDA tensors, one process, not while torch.compile traces."""
    if torch.compiler.is_compiling() or any(torch._subclasses.fake_tensor.is_fake(t) for t in tensors):
        return False
    if not all(t.device.type == "cuda" for t in tensors):
        return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not (distributed and torch.distributed.get_world_size() > 1)


def device_key(tensor):
    """The device part of a key: the GPU's name, so a cache file serves every card of one model."""
    if tensor.device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(tensor.device)
    return tensor.device.type
