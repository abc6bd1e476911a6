"""Options and parametrisation of the pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``).

Each test is one (shape, operation, provider); tests of one shape and operation share a
pytest-benchmark group, so each group compares the providers on the same work.
"""
import pytest
import torch

from . import cases


def pytest_addoption(parser):
    group = parser.getgroup("lpjepa benchmarks")
    group.addoption("--quick", action="store_true", help="CPU: seed and official shapes only, no torch.compile")
    group.addoption("--shapes", help=f"comma-separated shape names from {', '.join(cases.SHAPES)}")
    group.addoption("--ops", help=f"comma-separated operations from {', '.join(cases.OPERATIONS)}")
    group.addoption("--providers", help=f"comma-separated providers from {', '.join(cases.PROVIDERS)}")
    group.addoption(
        "--bench-device", choices=("cpu", "cuda"), help="default: cuda when torch sees a GPU, else cpu"
    )


def _selection(config):
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = config.getoption("--quick")
    shapes, ops, providers = (config.getoption(name) for name in ("--shapes", "--ops", "--providers"))
    shapes = cases.parse_list(shapes, cases.SHAPES, "shape") if shapes else cases.default_shapes(device, quick)
    ops = cases.parse_list(ops, cases.OPERATIONS, "operation") if ops else list(cases.OPERATIONS)
    providers = cases.parse_list(providers, cases.PROVIDERS, "provider") if providers else list(cases.PROVIDERS)
    return device, quick, shapes, ops, providers


def pytest_generate_tests(metafunc):
    if "work" not in metafunc.fixturenames:
        return
    device, quick, shapes, ops, providers = _selection(metafunc.config)
    params = [
        pytest.param((device, quick, shape, op, provider), id=f"{op}-{shape}-{provider}")
        for shape in shapes
        for op in ops
        for provider in providers
    ]
    metafunc.parametrize("work", params, indirect=True)


@pytest.fixture
def work(request):
    """A warm ``cases.Case``, or a skip saying why its provider cannot run here."""
    device, quick, shape_name, op, provider = request.param
    explicit = request.config.getoption("--providers")
    reason = None if explicit else cases.skip_reason(provider, device, quick)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    try:
        return cases.build(op, provider, cases.SHAPES[shape_name], device)
    except cases.Unavailable as why:
        pytest.skip(f"{provider} unavailable: {why}")
