"""``pytest bench/ --benchmark-only``: each fused kernel against the PyTorch eager code it replaces.

On a GPU every round is synchronised (the target calls ``torch.cuda.synchronize``) and the event timing of
``triton.testing.do_bench`` (median, with an L2 flush between runs) is stored in ``extra_info`` together
with the achieved GB/s and TFLOP/s: for kernels under ~50 us the event time is the figure to read.
"""

from __future__ import annotations

import pytest
import torch

from cases import all_cases, case_ids, gpu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _synchronised(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case_id", case_ids())
def test_kernel(benchmark, case_id: str, impl: str) -> None:
    case = all_cases(DEVICE)[case_id]()
    fn = case.fused if impl == "triton" else case.eager
    benchmark.group = case_id
    benchmark.extra_info.update(name=case.name, shape=case.shape, impl=impl,
                                mode="gpu" if gpu() else "cpu-interpreter (tiny sizes, not a measurement)")
    if gpu():
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        benchmark.extra_info.update(event_median_us=ms * 1e3, gbps=case.bytes / ms / 1e6,
                                    tflops=case.flops / ms / 1e9)
        benchmark.pedantic(_synchronised(fn), rounds=50, iterations=1, warmup_rounds=5)
    else:
        benchmark.pedantic(_synchronised(fn), rounds=1, iterations=1, warmup_rounds=0)
