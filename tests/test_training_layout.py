"""The training package sits below the programs and above the loss: what its modules may import."""
import ast
import pathlib

import lpjepa.training

TRAINING = pathlib.Path(lpjepa.training.__file__).parent
# The loss side's stable surface; the programs (train, eval, plot) and the reference (the tests' oracle) stay out.
ALLOWED_FROM_LPJEPA = {"loss", "distributed", "metrics", "rgg"}


def lpjepa_imports(path):
    """Modules of lpjepa outside lpjepa.training that a file imports (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 2:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lpjepa"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lpjepa")}
    return found


def test_training_imports_only_the_loss_side_surface():
    for path in sorted(TRAINING.glob("*.py")):
        assert lpjepa_imports(path) <= ALLOWED_FROM_LPJEPA, path.name


def test_training_projector_has_the_seed_parameter_names():
    from lpjepa.training.model import Projector

    names = [name for name, _ in Projector(dim=8).named_parameters()]
    assert names == [f"model.{i}.{p}" for i in (0, 1, 3, 4, 6) for p in ("weight", "bias")]
