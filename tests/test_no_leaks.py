"""A test whose teardown fails leaves no trace on the tests after it, and a test that leaks is named.

A pytest session in a subprocess (this folder's conftest.py and _state.py beside three
scratch modules) runs, in order: a test that patches shared state through the ``patch``
fixture and then fails in teardown twice (a fixture's teardown raises, and one of its own
undos raises, as torch's cuBLASModule makes pytest 9.2's monkeypatch do); a test that
patches the same state with plain ``monkeypatch`` (the failure of issue 22 on pytest 9.2);
a test that changes it on purpose and puts nothing back; and then tests that check the
state is what it was. The later tests must pass, and the leaking ones must be named with
what they changed.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import _state

HERE = Path(__file__).parent

PATCHES_THEN_TEARDOWN_RAISES = '''
import pytest
import torch

import lpjepa
from lpjepa.ops import backend


class WritesOnce:
    """An attribute that cannot be written back: its undo raises, between the other undos."""

    def __init__(self):
        object.__setattr__(self, "writes", 0)
        object.__setattr__(self, "value", 1)

    def __setattr__(self, name, value):
        if self.writes:
            raise AttributeError("WritesOnce refuses to be written back")
        object.__setattr__(self, "writes", 1)
        object.__setattr__(self, name, value)


@pytest.fixture
def teardown_raises():
    yield
    raise RuntimeError("this fixture's teardown fails")


def test_patches_then_its_teardown_raises(patch, teardown_raises):
    real = lpjepa.RDMReg.forward
    patch.setattr(lpjepa.RDMReg, "forward", lambda self, *a, **k: 1.03 * real(self, *a, **k))
    patch.setattr(WritesOnce(), "value", 2)
    patch.torch_flag(torch.backends.cuda.matmul, "allow_tf32", True)
    patch.setenv("LPJEPA_SORT_PATH", "torch_sort")
    patch.setattr(backend, "TRITON_DEVICE_TYPES", {"cuda", "cpu"})
    patch.setitem(backend._UNAVAILABLE, ("sliced_wasserstein", "cpu"), "a failure that never happened")


def test_monkeypatch_as_in_issue_22(monkeypatch):
    real = lpjepa.RDMReg.forward
    monkeypatch.setattr(lpjepa.RDMReg, "forward", lambda self, *a, **k: 1.03 * real(self, *a, **k))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setenv("LPJEPA_PROJECTION_PATH", "cublas")
'''

LEAKS_ON_PURPOSE = '''
import os

import torch

import lpjepa
from lpjepa.ops import backend


def test_leaks_on_purpose():
    torch.backends.cuda.matmul.allow_tf32 = True
    os.environ["LPJEPA_PROJECTION_PATH"] = "cublas"
    lpjepa.RDMReg.forward = lambda self, *args, **kwargs: torch.zeros(())
    backend._UNAVAILABLE[("rgg_sample", "cpu")] = "a failure that never happened"
'''

STATE_IS_INTACT = '''
import os

import torch

import lpjepa
from lpjepa import reference
from lpjepa.ops import backend


def test_the_module_computes_the_reference():
    gen = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(2, 13, 6, dtype=torch.float64, generator=gen).unbind()
    target = torch.rand(13, 6, dtype=torch.float64, generator=gen)
    projections = reference.random_projections(8, 6, dtype=torch.float64, generator=gen)
    ours = lpjepa.RDMReg(num_projections=8, backend="torch")(z1, z2, target=target, projections=projections)
    want = sum(reference.rdmreg_loss(z, target, projections=projections) for z in (z1, z2)) / 2
    torch.testing.assert_close(ours, want, atol=1e-12, rtol=1e-10)


def test_torch_switches_are_as_at_the_start():
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cuda.matmul.fp32_precision == "none"


def test_environment_and_caches_are_as_at_the_start():
    assert "LPJEPA_SORT_PATH" not in os.environ and "LPJEPA_PROJECTION_PATH" not in os.environ
    assert backend.TRITON_DEVICE_TYPES == {"cuda"} and backend._UNAVAILABLE == {}
'''


def run_scratch_session(folder):
    """(outcomes as {(outcome, test name)}, the whole output) of a pytest session over the scratch modules."""
    for helper in ("conftest.py", "_state.py"):
        shutil.copy(HERE / helper, folder / helper)
    (folder / "test_a_teardown_raises.py").write_text(PATCHES_THEN_TEARDOWN_RAISES)
    (folder / "test_b_leaks_on_purpose.py").write_text(LEAKS_ON_PURPOSE)
    (folder / "test_c_state_is_intact.py").write_text(STATE_IS_INTACT)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "-p", "no:randomly", "--rootdir", str(folder),
         str(folder)],
        cwd=folder, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    outcomes = set(re.findall(r"^(PASSED|FAILED|ERROR) \S*?::(\w+)", output, flags=re.MULTILINE))
    return outcomes, output


def test_a_failing_teardown_leaves_no_trace_and_a_leak_is_named(tmp_path):
    outcomes, output = run_scratch_session(tmp_path)
    later = ("test_the_module_computes_the_reference", "test_torch_switches_are_as_at_the_start",
             "test_environment_and_caches_are_as_at_the_start")
    for name in later:
        assert ("PASSED", name) in outcomes and ("FAILED", name) not in outcomes, output
    # The teardowns that raise are reported, and nothing leaked through them.
    assert ("ERROR", "test_patches_then_its_teardown_raises") in outcomes, output
    raised = [m for m in ("this fixture's teardown fails", "WritesOnce refuses to be written back") if m in output]
    assert len(raised) == 2 if pytest.version_tuple >= (8,) else raised, output  # pytest 7 reports the first only
    assert "test_patches_then_its_teardown_raises left shared state changed" not in output, output
    # monkeypatch: pytest 9.2's undo raises on torch's cuBLASModule and leaves RDMReg.forward patched; older
    # ones restore allow_tf32 but leave torch's matmul precision 'ieee' or 'tf32' instead of 'none'. Either way
    # the check names the test and puts the state back.
    assert ("ERROR", "test_monkeypatch_as_in_issue_22") in outcomes, output
    assert "test_monkeypatch_as_in_issue_22 left shared state changed" in output, output
    # The leak on purpose is named, with each thing it changed.
    assert ("ERROR", "test_leaks_on_purpose") in outcomes, output
    leak_report = output[output.index("test_leaks_on_purpose left shared state changed"):]
    for change in ("torch.backends.cuda.matmul.allow_tf32: False -> True",
                   "environment LPJEPA_PROJECTION_PATH: unset -> 'cublas'",
                   "lpjepa.loss.RDMReg.forward: replaced",
                   "lpjepa.ops.backend._UNAVAILABLE: ('rgg_sample', 'cpu') added"):
        assert change in leak_report, leak_report


@pytest.mark.parametrize("path", _state.EXACT_CACHES + _state.MEMO_CACHES + _state.WATCHED_INSTANCES)
def test_every_watched_cache_exists(path):
    # A cache renamed in the package is named here (update tests/_state.py), not silently left unwatched.
    import lpjepa.kernels.launch  # noqa: F401
    import lpjepa.ops.backend  # noqa: F401
    import lpjepa.ops.path_choice  # noqa: F401

    parent, name = path.rsplit(".", 1)
    assert hasattr(_state.resolve(parent), name), f"{path} no longer exists: update tests/_state.py"
