"""Every GPU-only test carries the ``cuda`` marker, so ``pytest -m cuda`` (benchmarks/gpu_check.sh) runs them all.

Without a GPU, conftest.py skips every test so marked. A test that skipped itself for
lack of CUDA some other way (``skipif(not HAS_CUDA)``, ``pytest.skip`` in its body) would
be missed by ``-m cuda``; so would a test that puts tensors on CUDA without the marker.
This reads the test files' source and finds both.
"""
import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _is_cuda_string(node):
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("cuda")


def _mentions_cuda(node):
    """A CUDA condition: HAS_CUDA, torch.cuda.is_available(), or a 'cuda' device string."""
    return any(
        _is_cuda_string(n)
        or (isinstance(n, ast.Name) and n.id == "HAS_CUDA")
        or (isinstance(n, ast.Attribute) and n.attr == "is_available")
        for n in ast.walk(node)
    )


def _puts_tensors_on_cuda(node):
    """x.cuda(), x.to('cuda'), device='cuda...', torch.Generator('cuda'), or a 'cuda' device as a positional argument."""
    for n in ast.walk(node):
        if not isinstance(n, ast.Call):
            continue
        name = ast.unparse(n.func)
        if name.endswith(".cuda"):
            return True
        if any(k.arg == "device" and _is_cuda_string(k.value) for k in n.keywords):
            return True
        if (name.endswith(".to") or name.endswith("Generator")) and n.args and _is_cuda_string(n.args[0]):
            return True
    return False


def _is_cuda_marked(function, module_marks):
    names = {ast.unparse(d) for d in function.decorator_list} | module_marks
    return bool(names & {"requires_cuda", "pytest.mark.cuda"})


def _gpu_tests_without_marker(path):
    tree = ast.parse(path.read_text())
    module_marks = set()
    for node in tree.body:  # pytestmark = requires_cuda marks a whole file
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
            module_marks.add(ast.unparse(node.value))
    problems = []
    for function in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")):
        skipif_on_cuda = [d for d in function.decorator_list if "skipif" in ast.unparse(d) and _mentions_cuda(d)]
        skip_calls = [
            n for n in ast.walk(function)
            if isinstance(n, ast.If) and _mentions_cuda(n.test)
            and any(isinstance(c, ast.Call) and ast.unparse(c.func) == "pytest.skip" for c in ast.walk(n))
        ]
        uses_cuda = any(_puts_tensors_on_cuda(statement) for statement in function.body)
        if skipif_on_cuda or skip_calls:
            problems.append(f"{path.name}::{function.name} skips itself for CUDA: mark it requires_cuda instead")
        elif uses_cuda and not _is_cuda_marked(function, module_marks):
            problems.append(f"{path.name}::{function.name} uses CUDA but is not marked requires_cuda")
    return problems


def test_every_gpu_only_test_is_marked():
    problems = [p for path in sorted(TESTS.glob("test_*.py")) for p in _gpu_tests_without_marker(path)]
    assert not problems, "\n".join(problems)


def test_the_check_finds_an_unmarked_gpu_test(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text(
        "import pytest, torch\n"
        "from conftest import HAS_CUDA\n"
        "@pytest.mark.skipif(not HAS_CUDA, reason='gpu')\n"
        "def test_a(): pass\n"
        "def test_b():\n    torch.ones(1, device='cuda')\n"
        "def test_c():\n    if not torch.cuda.is_available():\n        pytest.skip('no gpu')\n"
        "@requires_cuda\n"
        "def test_d():\n    torch.ones(1).cuda()\n"
    )
    problems = _gpu_tests_without_marker(bad)
    assert [p.split("::")[1].split()[0] for p in problems] == ["test_a", "test_b", "test_c"]
