"""Which backend computes a call: the torch body of an op, or its Triton body over ``lpjepa.kernels``; and the fallback.

The kernels are loaded on first use, never by ``import lpjepa``: importing them imports
Triton. A call asks ``use_triton`` (or ``run_op``, which also falls back), and the answer
for a (op, backend, device, dtype) is kept, so a step pays for the decision once.

A Triton op that cannot run here (Triton missing, a GPU below ``MIN_CAPABILITY``, no C
compiler for Triton's launcher, a compile or launch error) never strands a user: under
``backend='auto'`` the call is computed on the torch backend, with one
``TritonFallbackWarning`` per op and device naming the cause (``LPJEPA_TRITON_FALLBACK=quiet``
silences it), and later calls there go to torch directly; ``backend='triton'`` raises
``KernelUnavailable`` with the same cause.
"""
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_FALLBACK = "LPJEPA_TRITON_FALLBACK"
# The oldest GPUs the kernels are compiled and checked for: sm_75 (Turing, T4).
MIN_CAPABILITY = (7, 5)

# The device types 'auto' sends to Triton. Tests add 'cpu' to run the fallback's
# machinery on Triton's interpreter.
TRITON_DEVICE_TYPES = {"cuda"}

# Filled on first use. A dict and an import statement rather than functools.lru_cache and
# importlib: torch.compile traces both (it cannot trace importlib.import_module), so a
# compiled model's first call does not break its graph here.
_LOADED = {}
# {(op, device): KernelUnavailable} of the ops that failed here: 'auto' goes to torch.
_UNAVAILABLE = {}
# {device: why the kernels cannot run there, or None}: the capability is read once per device, not per call.
_REASONS = {}
# {(op, backend, device, dtype): whether Triton runs it}: use_triton's answers, cleared by a fallback.
_DECISIONS = {}


class TritonFallbackWarning(UserWarning):
    """A call under ``backend='auto'`` ran on the torch backend because the Triton kernels cannot run."""


class KernelUnavailable(RuntimeError):
    """The Triton kernels of ``op`` cannot run on ``device``; ``cause`` says why (the original exception or a reason)."""

    def __init__(self, op, device, cause):
        self.op, self.device, self.cause = op, device, cause
        super().__init__(f"{self.what()}. Pass backend='torch', or backend='auto' to fall back to it with a "
                         f"warning.{_hint(cause)}")

    def what(self):
        """What cannot run where, and why."""
        return f"lpjepa's Triton kernels for {self.op} cannot run on {_describe(self.device)}: {_first_line(self.cause)}"

    def fallback_message(self):
        """The warning of ``backend='auto'``: the cause, what happens instead, how to silence it."""
        return (f"{self.what()}. backend='auto' computes it on the torch backend instead (the same result, slower); "
                f"set {ENV_FALLBACK}=quiet to silence this warning, or pass backend='torch'.{_hint(self.cause)}")


def _first_line(cause):
    if isinstance(cause, BaseException):
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[0] if text else '(no message)'}"
    return str(cause)


def _hint(cause):
    text = _first_line(cause).lower()
    if "c compiler" in text or "cc" in text.split():
        return " Triton builds its launcher with a C compiler: install one (gcc or clang) or point CC at it."
    if "ptxas" in text:
        return " Triton compiles with NVIDIA's ptxas: install the CUDA toolkit's, or point TRITON_PTXAS_PATH at one."
    if "triton" in text and ("no module" in text or "not installed" in text):
        return " Install Triton (pip install triton) for the kernels."
    return ""


def _describe(device):
    """'cuda:0 (NVIDIA T4, sm_75)' for a GPU; the device itself otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    try:
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, sm_{major}{minor})"
    except Exception:  # the description must never be what fails
        return str(device)


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got backend={backend!r}")


def _load_kernels():
    """({op name: its kernels module in ``lpjepa.kernels``}, None), or (None, the reason they cannot be loaded)."""
    if "ops" not in _LOADED:
        try:
            from ..kernels import rgg_sample, sliced_wasserstein

            _LOADED["ops"] = (dict(rgg_sample=rgg_sample, sliced_wasserstein=sliced_wasserstein), None)
        except ImportError as error:  # triton missing, or no kernels on this platform
            _LOADED["ops"] = (None, error)
    return _LOADED["ops"]


def kernels(op):
    """The kernels module of ``op`` ('sliced_wasserstein' or 'rgg_sample'); for Triton bodies, after ``use_triton``."""
    loaded = _LOADED.get("ops")  # every launch plan asks: one look-up once loaded
    return (loaded or _load_kernels())[0][op]


def _capability(device):
    return torch.cuda.get_device_capability(device)


def _unavailable_reason(device):
    """Why the kernels cannot run on ``device`` before trying them, or None; asked once per device."""
    key = _device_key(device)
    if key not in _REASONS:
        _REASONS[key] = None
        if device.type == "cuda" and torch.cuda.is_available():
            major, minor = _capability(device)
            if (major, minor) < MIN_CAPABILITY:
                _REASONS[key] = (f"compute capability {major}.{minor} is below {MIN_CAPABILITY[0]}."
                                 f"{MIN_CAPABILITY[1]}, the oldest the kernels are built for")
    return _REASONS[key]


def _device_key(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _fall_back(failure):
    """Remembers ``failure`` and warns once per op and device, unless silenced."""
    key = (failure.op, _device_key(failure.device))
    if key in _UNAVAILABLE:
        return
    _UNAVAILABLE[key] = failure
    _DECISIONS.clear()
    if os.environ.get(ENV_FALLBACK, "").lower() != "quiet":
        warnings.warn(failure.fallback_message(), TritonFallbackWarning, stacklevel=4)


def use_triton(op, backend, device, dtype=None):
    """Whether ``backend`` runs ``op`` ('sliced_wasserstein' or 'rgg_sample') on its Triton body on ``device``.

    'auto' picks Triton for CUDA tensors when the kernels can run there (else warns once
    and picks torch), and keeps float64 (``dtype``) on torch, since the kernels compute in
    fp32; 'triton' insists, and raises ``KernelUnavailable`` saying what is missing when it
    cannot run; 'torch' never loads the kernels. The answer is kept per (op, backend,
    device, dtype), and forgotten when an op falls back.
    """
    key = (op, backend, device, dtype)
    decided = _DECISIONS.get(key)
    if decided is None:
        decided = _DECISIONS[key] = _decide(op, backend, torch.device(device), dtype)
    return decided


def _decide(op, backend, device, dtype):
    check_backend(backend)
    if backend == "torch":
        return False
    if backend == "auto" and (device.type not in TRITON_DEVICE_TYPES or dtype == torch.float64):
        return False
    if backend == "auto" and (op, _device_key(device)) in _UNAVAILABLE:
        return False
    modules, import_error = _load_kernels()
    reason = import_error if modules is None else _unavailable_reason(device)
    if reason is not None:
        failure = KernelUnavailable(op, device, reason)
        if backend == "triton":
            raise failure from (reason if isinstance(reason, BaseException) else None)
        _fall_back(failure)
        return False
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on CPU tensors runs Triton's interpreter, which needs TRITON_INTERPRET=1 in the "
            "environment before lpjepa is imported; or use backend='torch' on the CPU."
        )
    return True


# What a failed compile or launch raises is Triton's (CompilationError, OutOfResources), the
# launcher build's (RuntimeError, CalledProcessError) or the driver's; what an argument error
# raises the torch backend would raise too, and a full GPU is full for torch as well.
_NOT_KERNEL_FAILURES = (ValueError, TypeError, torch.cuda.OutOfMemoryError)


def run_op(op, backend, device, dtype, on_triton, on_torch):
    """``on_triton()`` when ``backend`` picks the Triton body of ``op`` (``use_triton``), else ``on_torch()``.

    A kernel that fails to compile or launch raises ``KernelUnavailable`` under 'triton';
    under 'auto' the call runs ``on_torch()`` with a ``TritonFallbackWarning`` (once per op
    and device; later calls there skip Triton). While ``torch.compile`` traces, nothing is
    caught: a traced graph holds the kernels or fails to build, never a silent fallback.
    """
    if not use_triton(op, backend, device, dtype):
        return on_torch()
    if torch.compiler.is_compiling():
        return on_triton()
    return run_guarded(op, device, backend == "triton", on_triton, on_torch)


def run_guarded(op, device, strict, on_triton, on_torch):
    """``on_triton()``; if its kernels fail to compile or launch, ``KernelUnavailable`` when ``strict``
    (backend='triton'), else a ``TritonFallbackWarning`` (``op`` goes to torch on ``device`` from then on)
    and ``on_torch()``. ``run_op``'s guard, and the backward's, whose kernel compiles at the first backward."""
    try:
        return on_triton()
    except _NOT_KERNEL_FAILURES:
        raise
    except Exception as error:
        failure = KernelUnavailable(op, device, error)
        if strict:
            raise failure from error
        _fall_back(failure)
    return on_torch()
