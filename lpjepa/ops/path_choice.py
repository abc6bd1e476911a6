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
  fills it for the benchmark shapes. Every key ends with the torch and Triton versions
  (``versions_key``): an upgrade measures again. Several processes may write the file at
  once (the ranks of ``torchrun`` on one machine): each write, under a lock on
  ``paths.json.lock``, re-reads it, adds its own decisions to what the others wrote, and
  replaces it atomically (a temporary file in the same folder, then ``os.replace``), so a
  reader sees one whole file or the other, never a torn one, and no decision is lost; a
  file that does not parse as a dict of decisions counts as empty.
* ``LPJEPA_PROJECTION_PATH`` / ``LPJEPA_SORT_PATH`` force a path; ``LPJEPA_AUTOTUNE=0``
  turns the timing off (the cached or default choice is used).
* While ``torch.compile`` traces, while a CUDA graph is being captured (the timer's events
  and every path's launches would be recorded into the graph), under a
  ``torch.distributed`` process group of more than one process (every rank must take the
  same path, and ranks may see different shapes), and off CUDA, nothing is timed: the
  cached choice is used, else the default.

Shape buckets round every size up to a power of two, so one measurement covers the
batch sizes of a training run.
"""
import contextlib
import functools
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile

import torch

ENV_CACHE_DIR = "LPJEPA_CACHE_DIR"
ENV_AUTOTUNE = "LPJEPA_AUTOTUNE"
ENV_FORCED = {"projection": "LPJEPA_PROJECTION_PATH", "sort": "LPJEPA_SORT_PATH"}


def environment_reader(name):
    """A function of no argument that returns ``os.environ.get(name)``, at about a dict look-up's cost.

    Every path look-up asks for its forcing variable (a user or a test may set it mid-run),
    and ``os.environ.get`` runs four Python functions (``Mapping.get``, ``__getitem__``, the
    key's encoding, the value's decoding): about a third of a memoised look-up's host time.
    CPython's ``os.environ`` keeps the environment in a dict, ``_data``, under encoded keys,
    which it updates on every change; the reader encodes ``name`` once and looks it up
    there. A Python whose ``os.environ`` lacks that layout gets ``os.environ.get``.
    """
    data, encode, decode = (getattr(os.environ, attribute, None) for attribute in ("_data", "encodekey", "decodevalue"))
    if not isinstance(data, dict) or encode is None or decode is None:
        return functools.partial(os.environ.get, name)
    key = encode(name)

    def read():
        value = data.get(key)
        return None if value is None else decode(value)

    return read


_FORCED = {step: environment_reader(name) for step, name in ENV_FORCED.items()}


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


def triton_version():
    """Triton's version, without importing it (``import lpjepa`` does not); 'none' when it is not installed."""
    if "triton" in sys.modules:
        return getattr(sys.modules["triton"], "__version__", "unknown")
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=None)
def versions_key():
    """The last part of every key: a decision measured under other torch or Triton versions is not reused."""
    return f"torch={torch.__version__}|triton={triton_version()}"


def _read_decisions(path):
    """{key: path} from the cache file; {} when it is missing, unreadable or not a dict of strings."""
    try:
        with open(path) as f:
            decisions = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(decisions, dict):
        return {}
    return {k: v for k, v in decisions.items() if isinstance(k, str) and isinstance(v, str)}


@contextlib.contextmanager
def _locked(path):
    """Holds an exclusive lock on ``path`` + '.lock' (POSIX ``flock``), so read-merge-write runs one process at a time.

    Without ``fcntl`` (Windows) it only relies on the atomic replace: a file never tears, but
    two processes writing at the same moment may each drop the other's newest decision.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
            self.decisions = _read_decisions(self.cache_file)
        return self.decisions

    def _save(self, new):
        """Writes ``new`` ({key: path}) over what the file holds now, which another process may have added to."""
        folder = os.path.dirname(self.cache_file) or "."
        try:
            os.makedirs(folder, exist_ok=True)
            with _locked(self.cache_file):
                merged = {**_read_decisions(self.cache_file), **new}
                # A name of its own per write: two writers never share a temporary file.
                fd, tmp = tempfile.mkstemp(prefix=".paths.", suffix=".tmp", dir=folder)
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(merged, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.cache_file)
                except BaseException:
                    os.unlink(tmp)
                    raise
        except OSError:
            pass  # a read-only home: the decision still holds for this process

    def forget(self):
        """Drops every decision this process remembers: the next calls measure again and write over the file's."""
        self._load().clear()
        _ANSWERS.clear()

    def knows(self, step, key):
        """Whether a decision for ``step`` at ``key`` is remembered (measured here, or read from the file)."""
        return f"{step}|{key}|{versions_key()}" in self._load()

    def choose(self, step, key, candidates, default, run, may_time):
        """The path for ``step`` ('projection' or 'sort') at ``key`` (a string).

        candidates: the paths that can run this call; default: the choice without a
        measurement; run(path): one call of that path on this call's inputs; may_time:
        whether timing is allowed now (see the module doc).
        """
        forced = _FORCED[step]()
        if forced:
            if forced not in candidates:
                raise ValueError(f"{ENV_FORCED[step]}={forced!r} cannot run this call; it takes one of {candidates}")
            return forced
        decisions = self._load()
        full_key = f"{step}|{key}|{versions_key()}"
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
        self._save({full_key: best})
        return best


CHOOSER = PathChooser()


def capturing_cuda_graph():
    """Whether the current CUDA stream is capturing a graph; False (without initializing CUDA) before CUDA is in use."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def may_time(*tensors):
    """Whether a path may be timed now: eager CUDA tensors outside a graph capture, one process, not while tracing."""
    if torch.compiler.is_compiling() or any(torch._subclasses.fake_tensor.is_fake(t) for t in tensors):
        return False
    if not all(t.device.type == "cuda" for t in tensors) or capturing_cuda_graph():
        return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not (distributed and torch.distributed.get_world_size() > 1)


_GPU_NAMES = {}  # {CUDA device: its name}, asked of the driver once per device


def gpu_name(device):
    """The device part of a key: the GPU's name, so a cache file serves every card of one model; the type off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return device.type
    if device not in _GPU_NAMES:
        _GPU_NAMES[device] = torch.cuda.get_device_name(device)
    return _GPU_NAMES[device]


# {(step, the call's shape and settings, forced path): path}: what ``choose`` answered, so a
# step at a shape already seen pays one dict look-up. Only answers that hold for good are
# kept (forced, remembered or measured; not a default given while timing was not allowed).
_ANSWERS = {}


def _answer(memo_key, device, key, candidates, default, run, timing_allowed):
    """``CHOOSER.choose``'s answer, kept in ``_ANSWERS`` when it cannot change: forced, decided, or off CUDA."""
    step, forced = memo_key[0], memo_key[-1]
    path = CHOOSER.choose(step, key(), candidates(), default(), run, timing_allowed())
    if forced or device.type != "cuda" or CHOOSER.knows(step, key()):
        _ANSWERS[memo_key] = path
    return path


def projection_path(x, directions, allow_tf32, timing_allowed=None):
    """The projection path ('triton' or 'cublas') for x (S, B, D) onto directions (K, D) or (S, K, D).

    x: a tensor, or a tuple of S (B, D) tensors (``project_plan``'s separate sources).
    timing_allowed: None asks ``may_time``; True measures even where it would not (the sweep).
    """
    separate = isinstance(x, tuple)
    first = x[0] if separate else x
    shape = (len(x), *first.shape) if separate else x.shape
    # ``LPJEPA_AUTOTUNE`` is not part of the key: a forced, decided or off-CUDA answer is the same either way.
    memo_key = ("projection", first.device, first.dtype, allow_tf32, shape, directions.shape, _FORCED["projection"]())
    path = _ANSWERS.get(memo_key)
    if path is not None:
        return path
    from ..kernels import sliced_wasserstein as kernels
    from ..kernels.launch import device_arch

    sources, batch, dim = shape

    def key():
        return (f"{gpu_name(first.device)}|{first.dtype}|tf32={allow_tf32}|S={sources}|B={bucket(batch)}|D={bucket(dim)}"
                f"|K={bucket(directions.shape[-2])}")

    def run(path):
        for launch in kernels.project_plan(x, directions, path=path, allow_tf32=allow_tf32)[1]:
            launch()

    return _answer(memo_key, first.device, key, lambda: list(kernels.PROJECTION_PATHS),
                   lambda: kernels.default_paths(batch, arch=device_arch(first.device))[0],  # cuBLAS below sm_80
                   run, lambda: may_time(first, directions) if timing_allowed is None else timing_allowed)


def sort_path(proj, proj_t, need_target_residual, timing_allowed=None):
    """The sort path ('registers' or 'torch_sort') for proj (V, K, B) against proj_t (T, K, B); timing_allowed as above."""
    memo_key = ("sort", proj.device, proj.shape, proj_t.shape[0], need_target_residual, _FORCED["sort"]())
    path = _ANSWERS.get(memo_key)
    if path is not None:
        return path
    from ..kernels import sliced_wasserstein as kernels

    views, num_projections, batch = proj.shape

    def key():
        return (f"{gpu_name(proj.device)}|V={views}|T={proj_t.shape[0]}|B={bucket(batch)}|K={bucket(num_projections)}"
                f"|target_residual={need_target_residual}")

    def run(path):
        for launch in kernels.sort_residual_plan(proj, proj_t, need_target_residual=need_target_residual,
                                                 path=path)[1]:
            launch()

    return _answer(memo_key, proj.device, key, lambda: list(kernels.sort_paths_for(batch, need_target_residual)),
                   lambda: kernels.default_paths(batch, need_target_residual)[1], run,
                   lambda: may_time(proj, proj_t) if timing_allowed is None else timing_allowed)
