"""Process-wide state the tests change, how they change it without leaving a trace, and the check that they do.

A test that changes shared state (torch's switches, environment variables, attributes of
modules and classes, the package's caches) does it through the helpers here, each of which
restores in a ``finally``: ``patched``, ``env``, ``item``, ``torch_flag``, or conftest's
``patch`` fixture, which holds them on an ``ExitStack`` so that one restore that raises
does not skip the others. pytest's ``monkeypatch`` undoes its changes in one loop that stops
at the first error (pytest 9.2 calls ``delattr`` on ``torch.backends.cuda.matmul``, which
torch refuses), and the changes after it stay for the rest of the session.

``Snapshot`` records that state before each test; conftest's autouse check compares after
it, puts back whatever changed and fails the test, naming each change.
"""
import contextlib
import functools
import inspect
import os
import sys
import types

import torch

_ABSENT = object()


# ----------------------------------------------------------------------------- helpers that restore in a finally


@contextlib.contextmanager
def patched(obj, name, value):
    """``obj.name = value`` inside the block; afterwards the attribute as it was (or its absence), whatever happens.

    The attribute must exist (a misspelt name fails here, not silently). torch's backend
    switches go through ``torch_flag`` instead: their setters change more than they say.
    """
    if type(obj).__module__.startswith("torch.backends"):
        raise TypeError(f"set torch.backends switches with torch_flag({type(obj).__name__}, {name!r}, ...), which "
                        "restores the precision settings that the switch changes with it")
    getattr(obj, name)
    own = getattr(obj, "__dict__", {})
    if name in own:  # the object's own entry (a module's global, a class's method): put that very entry back
        old = own[name]
        restore = lambda: setattr(obj, name, old)  # noqa: E731
    elif inspect.isclass(obj) or isinstance(obj, types.ModuleType) or hasattr(type(obj), name):
        restore = lambda: delattr(obj, name)  # noqa: E731  (inherited: dropping the override brings it back)
    else:
        old = getattr(obj, name)
        restore = lambda: setattr(obj, name, old)  # noqa: E731
    setattr(obj, name, value)
    try:
        yield value
    finally:
        restore()


@contextlib.contextmanager
def env(**variables):
    """Environment variables set (a string) or unset (None) inside the block; each as it was afterwards."""
    old = {name: os.environ.get(name) for name in variables}
    try:
        for name, value in variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = str(value)
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def item(mapping, key, value):
    """``mapping[key] = value`` inside the block; the entry as it was (or its absence) afterwards."""
    old = mapping.get(key, _ABSENT)
    mapping[key] = value
    try:
        yield value
    finally:
        if old is _ABSENT:
            mapping.pop(key, None)
        else:
            mapping[key] = old


@contextlib.contextmanager
def torch_switches():
    """Every switch in ``TORCH_SWITCHES`` as it was before the block, afterwards."""
    old = [(_read(read), write) for _, read, write in torch_switch_list()]
    try:
        yield
    finally:
        _write_all(old)


def _write_all(values):
    """Writes [(value, write)] in order, skipping values that could not be read."""
    for value, write in values:
        if not (isinstance(value, str) and value.startswith("<raises")):
            write(value)


@contextlib.contextmanager
def torch_flag(flags, name, value):
    """``flags.name = value`` for a ``torch.backends`` switch (e.g. ``torch.backends.cuda.matmul``, 'allow_tf32').

    Setting ``allow_tf32`` also sets the matmul's ``fp32_precision`` ('none' becomes 'ieee' or
    'tf32'), which putting ``allow_tf32`` back does not undo: every switch is restored.
    """
    with torch_switches():
        setattr(flags, name, value)
        yield value


class Patcher:
    """The ``patch`` fixture: monkeypatch's verbs on the helpers above, restored in reverse order after the test."""

    def __init__(self, stack):
        self._stack = stack

    def setattr(self, obj, name, value):
        return self._stack.enter_context(patched(obj, name, value))

    def setenv(self, name, value):
        self._stack.enter_context(env(**{name: value}))

    def delenv(self, name, raising=True):
        if raising and name not in os.environ:
            raise KeyError(f"environment variable {name} is not set")
        self._stack.enter_context(env(**{name: None}))

    def setitem(self, mapping, key, value):
        return self._stack.enter_context(item(mapping, key, value))

    def torch_flag(self, flags, name, value):
        return self._stack.enter_context(torch_flag(flags, name, value))


# ----------------------------------------------------------------------------- what is watched

def _attribute_path(path):
    """(parent, name) for a dotted path into torch."""
    parent_path, name = path.rsplit(".", 1)
    parent = torch
    for part in parent_path.split(".")[1:]:
        parent = getattr(parent, part)
    return parent, name


# torch's process-wide switches, as dotted attributes or as getter/setter pairs. torch keeps a legacy
# allow_tf32 flag beside each fp32_precision and its legacy readers raise when the two disagree ('used
# mix of the legacy and new APIs'): the legacy flags come first, so that they are put back first.
_TORCH_ATTRIBUTES = (
    "torch.backends.cuda.matmul.allow_tf32",
    "torch.backends.cudnn.allow_tf32",
    "torch.backends.fp32_precision",
    "torch.backends.cuda.matmul.fp32_precision",
    "torch.backends.cudnn.fp32_precision",
    "torch.backends.cudnn.conv.fp32_precision",
    "torch.backends.cudnn.rnn.fp32_precision",
    "torch.backends.mkldnn.fp32_precision",
    "torch.backends.mkldnn.matmul.fp32_precision",
    "torch.backends.mkldnn.conv.fp32_precision",
    "torch.backends.mkldnn.rnn.fp32_precision",
    "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction",
    "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction",
    "torch.backends.cudnn.benchmark",
    "torch.backends.cudnn.deterministic",
    "torch.backends.cudnn.enabled",
    "torch.backends.mkldnn.enabled",
)
_TORCH_GETTERS = (
    ("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
    ("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
    ("torch.is_grad_enabled()", torch.is_grad_enabled, torch.set_grad_enabled),
    ("torch.are_deterministic_algorithms_enabled()", torch.are_deterministic_algorithms_enabled,
     torch.use_deterministic_algorithms),
)


# Switches the code under test sets on purpose, for the process it runs in: the training program turns on
# cuDNN's autotuner on CUDA (lpjepa.training.speed.prepare_model). The check puts them back without failing the test.
SET_BY_THE_PROGRAMS = ("torch.backends.cudnn.benchmark",)


def torch_switch_list():
    """[(label, read(), write(value))] of torch's switches that this torch has."""
    switches = []
    has_precision_api = hasattr(torch.backends, "fp32_precision")
    for path in _TORCH_ATTRIBUTES:
        parent, name = _attribute_path(path)
        try:
            getattr(parent, name)
        except AttributeError:
            continue  # an older torch
        except RuntimeError:
            pass  # a legacy reader in a mixed state: still a switch to put back
        switches.append((path, lambda p=parent, n=name: getattr(p, n), lambda v, p=parent, n=name: setattr(p, n, v)))
    if not has_precision_api:
        switches.append(("torch.get_float32_matmul_precision()", torch.get_float32_matmul_precision,
                         torch.set_float32_matmul_precision))
    switches.extend(_TORCH_GETTERS)
    if hasattr(torch, "get_default_device"):
        switches.append(("torch.get_default_device()", torch.get_default_device, torch.set_default_device))
    return switches


# Environment variables: every one with these prefixes, and these names.
ENV_PREFIXES = ("LPJEPA_", "TRITON_", "TORCH", "PYTORCH_", "CUDA_", "NCCL_", "OMP_", "MKL_")
ENV_NAMES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "XDG_CACHE_HOME",
             "HOME", "PYTHONPATH", "CC")
# Set once for the whole process by torch's compiler at its first compile (torch._inductor), never by a test.
ENV_SET_BY_TORCH = ("TRITON_CACHE_DIR", "TRITON_PTXAS_PATH", "TRITON_LIBDEVICE_PATH", "TORCHINDUCTOR_CACHE_DIR",
                    "CUDA_HOME", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "TORCH_WARM_POOL")


def watched_environment():
    return {name: value for name, value in os.environ.items()
            if (name.startswith(ENV_PREFIXES) or name in ENV_NAMES) and name not in ENV_SET_BY_TORCH}


# The package's caches. Exact: must hold the same entries after a test. Memo: filled on first
# use, so a test may add entries, never change or drop one. A dotted path that no longer
# resolves is reported by tests/test_no_leaks.py (update the list when a cache is renamed).
EXACT_CACHES = (
    "lpjepa.ops.backend._UNAVAILABLE",
    "lpjepa.ops.backend.TRITON_DEVICE_TYPES",
)
MEMO_CACHES = (
    "lpjepa.ops.backend._LOADED",
    "lpjepa.ops.backend._REASONS",
    "lpjepa.ops.backend._DECISIONS",
    "lpjepa.kernels.launch._ARCH_OF_DEVICE",
    "lpjepa.ops.path_choice.CHOOSER.decisions",
    "lpjepa.ops.path_choice._ANSWERS",
    "lpjepa.ops.path_choice._GPU_NAMES",
    "lpjepa.ops.sliced_wasserstein._UNUSED",
)
# Objects whose own attributes are watched like a class's (a test replacing a method there).
WATCHED_INSTANCES = ("lpjepa.ops.path_choice.CHOOSER",)
# The instance attributes they fill as they work (checked as caches above, or reports).
_INSTANCE_MEMO = {"decisions", "measured", "cache_file"}

# Modules whose functions and classes tests replace (besides the package's own modules, whose every
# global is watched), and whose classes' methods are watched.
FOREIGN_MODULES = ("torch", "torch.cuda", "torch.distributed", "torch._subclasses.fake_tensor",
                   "torchvision.datasets", "timm")
FOREIGN_CLASSES = ("torch.Tensor",)  # not torch.nn.Module: torch._dynamo wraps its __init__ at the first compile


def _own_module(name):
    return name in ("lpjepa", "benchmarks") or name.startswith(("lpjepa.", "benchmarks."))


def resolve(path):
    """The object at a dotted path whose module is imported; _ABSENT when it is not (yet) there."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is not None:
            obj = module
            for part in parts[cut:]:
                obj = getattr(obj, part, _ABSENT)
                if obj is _ABSENT:
                    return _ABSENT
            return obj
    return _ABSENT


def _is_code(value):
    """Functions, classes and descriptors: what a test patches in a foreign module (its data may change on its own)."""
    return callable(value) or isinstance(value, (staticmethod, classmethod, property))


def _namespaces():
    """[(label, object, watch data too)] whose attributes are compared entry by entry."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not _own_module(name):
            continue
        found.append((name, module, True))
        for attr, value in list(vars(module).items()):
            if inspect.isclass(value) and value.__module__ == name:
                found.append((f"{name}.{attr}", value, True))
    for name in FOREIGN_MODULES:
        module = sys.modules.get(name)
        if module is None:
            continue
        found.append((name, module, False))
        if name == "torchvision.datasets":
            found.extend((f"{name}.{attr}", value, True) for attr, value in vars(module).items()
                         if inspect.isclass(value))
    for path in FOREIGN_CLASSES + WATCHED_INSTANCES:
        obj = resolve(path)
        if obj is not _ABSENT:
            found.append((path, obj, True))
    return found


class Snapshot:
    """The watched state now; ``changes()`` names each difference from it since, with how to put it back."""

    def __init__(self):
        self.switches = [(label, read, write, _read(read)) for label, read, write in torch_switch_list()]
        self.environment = watched_environment()
        self.namespaces = [(label, obj, data, dict(vars(obj))) for label, obj, data in _namespaces()]
        self.caches = {}
        for exact, paths in ((True, EXACT_CACHES), (False, MEMO_CACHES)):
            for path in paths:
                cache = resolve(path)
                if cache is not _ABSENT:
                    self.caches[path] = (exact, cache, _copy(cache))

    def changes(self):
        """[(what changed, how to put it back)] between this snapshot and now."""
        found = []
        # Any switch changed: all are written back, in order (see _TORCH_ATTRIBUTES).
        put_back_switches = functools.partial(_write_all, [(old, write) for _, _, write, old in self.switches])
        for label, read, write, old in self.switches:
            new = _read(read)
            if new == old:
                continue
            if label in SET_BY_THE_PROGRAMS:
                write(old)
            else:
                found.append((f"{label}: {old!r} -> {new!r}", put_back_switches))
        now = watched_environment()
        for name in sorted(set(now) | set(self.environment)):
            old, new = self.environment.get(name), now.get(name)
            if old != new:
                found.append((f"environment {name}: {_env_text(old)} -> {_env_text(new)}",
                              lambda n=name, v=old: os.environ.__setitem__(n, v) if v is not None
                              else os.environ.pop(n, None)))
        for label, obj, data, old in self.namespaces:
            found.extend(_namespace_changes(label, obj, data, old))
        for path, (exact, cache, old) in self.caches.items():
            found.extend(_cache_changes(path, exact, cache, old))
        return found


def _read(read):
    try:
        return read()
    except Exception as error:  # e.g. a legacy precision reader after both APIs were used
        return f"<raises {type(error).__name__}>"


def _env_text(value):
    return "unset" if value is None else repr(value)


def _copy(cache):
    return set(cache) if isinstance(cache, (set, frozenset)) else dict(cache) if isinstance(cache, dict) else cache


def _namespace_changes(label, obj, data, old):
    found, new = [], vars(obj)
    is_module = isinstance(obj, types.ModuleType)
    instance = not is_module and not inspect.isclass(obj)
    for name in set(old) | set(new):
        if instance and name in _INSTANCE_MEMO:
            continue
        if is_module and name.startswith("__"):
            continue  # torch._dynamo's compiled code (__compiled_fn_*, __builtins_dict_*), dropped by its reset()
        before, after = old.get(name, _ABSENT), new.get(name, _ABSENT)
        if before is after:
            continue
        if not data and not (_is_code(before) or _is_code(after)):
            continue
        if not data and getattr(after, "__wrapped__", None) is before:
            continue  # the library wrapping its own function (torch._dynamo wraps torch.manual_seed on import)
        if getattr(after, "hooked", False) and getattr(after, "__wrapped__", None) is before:
            continue  # torch.optim wraps an Optimizer subclass's step (its profiling hook) at the first instance
        if before is _ABSENT:
            if is_module:
                continue  # modules gain globals on their own: submodules imported, Triton's interpreter's names
            if name.startswith("__") and name.endswith("__"):
                continue  # Python's own caches (copyreg adds __slotnames__ to a class at its first pickling)
            found.append((f"{label}.{name}: added ({_short(after)})", lambda n=name: delattr(obj, n)))
        elif after is _ABSENT:
            found.append((f"{label}.{name}: removed", lambda n=name, v=before: setattr(obj, n, v)))
        else:
            found.append((f"{label}.{name}: replaced ({_short(before)} -> {_short(after)})",
                          lambda n=name, v=before: setattr(obj, n, v)))
    return found


def _cache_changes(path, exact, cache, old):
    now = resolve(path)
    if cache is None and not exact:
        return []  # not created yet when the test began (PathChooser.decisions loads at first use)
    if now is not cache:
        # Replaced by another object: the module's global (or the instance's attribute) is put back.
        parent, name = path.rsplit(".", 1)
        return [(f"{path}: replaced by another object", lambda: setattr(resolve(parent), name, cache))]
    if isinstance(cache, set):
        if cache == old:
            return []
        return [(f"{path}: {sorted(old)} -> {sorted(cache)}", lambda: (cache.clear(), cache.update(old)))]
    if not isinstance(cache, dict):
        return []
    changed = {key for key in old if key not in cache or cache[key] is not old[key]}
    added = set(cache) - set(old) if exact else set()
    if not changed and not added:
        return []

    def put_back():
        for key in added:
            cache.pop(key, None)
        for key in changed:
            cache[key] = old[key]
    what = ", ".join([f"{key} changed or dropped" for key in sorted(map(repr, changed))] +
                     [f"{key} added" for key in sorted(map(repr, added))])
    return [(f"{path}: {what}", put_back)]


def _short(value):
    text = getattr(value, "__qualname__", None) or repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
