"""pytest-benchmark suite: every provider of each operation at each shape.

    pytest benchmarks/ --benchmark-only [--quick] [--shapes seed,official] [--providers ...]

Groups are "<operation> <shape>", so ``--benchmark-group-by=group`` (the default)
puts the providers of the same work side by side. For providers timed alternately in one
process, with memory and a plot, use ``python -m benchmarks.report``.
"""
from . import cases


def test_speed(benchmark, work):
    benchmark.group = f"{cases.OPERATIONS[work.op]} | {work.shape}"
    benchmark.extra_info.update(
        shape=work.shape.name, B=work.shape.B, D=work.shape.D, K=work.shape.K,
        op=work.op, provider=work.provider, device=work.device, first_call_s=work.first_call_s,
    )
    benchmark(work.fn)
