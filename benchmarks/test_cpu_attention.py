"""The CPU attention kernel against what users already have: torch's fused
``scaled_dot_product_attention`` followed by the gate, at the benchmark shape (triplane-text).

    python -m pytest benchmarks/test_cpu_attention.py --benchmark-only -s

The two are timed alternately, call after call, so that both see the same machine (load, clock,
cache state); each figure is the best of its rounds. Targets, at the benchmark's prompts (8 to 77
tokens, as CLIP pads them): forward at least as fast as SDPA + gate, forward+backward at least
1.25x faster. Prompts of all 77 tokens (no padding to skip) are timed and reported, not held to a
target. ``dreamportrait info`` names the instruction set the kernel runs with;
BENCHMARKS.md how to time the AVX2 kernels on an AVX-512 machine.
"""

from __future__ import annotations

import time

import pytest
import torch
from workloads import ATTENTION_WORKLOADS

from dreamportrait import _extension
from dreamportrait.ops import gated_cross_attention
from dreamportrait.workloads import attention_inputs, sdpa_with_gate

TARGETS = {False: 1.0, True: 1.25}  # forward, forward+backward: minimum speed-up over SDPA + gate
ROUNDS = 9


def timed_call(function, inputs, backward):
    differentiable = [x.detach().requires_grad_(backward) for x in inputs[:4]]
    mask = inputs[4]
    grad_out = torch.ones(differentiable[0].shape)

    def call():
        out = function(*differentiable, mask, backend="cpu")
        if backward:
            torch.autograd.grad(out, differentiable, grad_out)

    return call


@pytest.mark.parametrize("prompts", [None, 77], ids=["prompts-8-to-77", "prompts-77"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_cpu_attention_against_sdpa(benchmark, prompts, backward):
    assert _extension.status().available, "benchmarking the kernel needs the built extension"
    workload = ATTENTION_WORKLOADS[0]
    inputs = attention_inputs(workload, prompt_tokens=prompts)
    calls = {"cpu": timed_call(gated_cross_attention, inputs, backward),
             "sdpa": timed_call(sdpa_with_gate, inputs, backward)}
    seconds = {name: [] for name in calls}

    def alternate():
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)

    benchmark.pedantic(alternate, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    best = {name: min(values) for name, values in seconds.items()}
    speed_up = best["sdpa"] / best["cpu"]
    benchmark.extra_info.update(cpu_ms=best["cpu"] * 1e3, sdpa_ms=best["sdpa"] * 1e3, speed_up=speed_up,
                                threads=torch.get_num_threads(), vector_bytes=_extension.status().cpu_vector_bytes)
    pass_name = "fwd+bwd" if backward else "fwd"
    print(f"\ngated_cross_attention {workload.name} {'prompts of 77' if prompts else 'prompts of 8-77'} {pass_name}: "
          f"cpu kernel {best['cpu'] * 1e3:.1f} ms, SDPA + gate {best['sdpa'] * 1e3:.1f} ms: {speed_up:.2f}x "
          f"({_extension.status().cpu_vector_bytes}-byte vectors, {torch.get_num_threads()} threads)")
    if prompts is None:
        assert speed_up >= TARGETS[backward], (
            f"{pass_name}: {speed_up:.2f}x SDPA + gate, the target is {TARGETS[backward]}x")
