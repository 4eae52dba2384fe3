"""Each op's gradient requested for one input alone (planes without points, points without planes,
...): it equals that input's gradient when every input requires one, computed with the PyTorch
reference in float64, and no other input gets a gradient."""

import pytest
import torch
from support import kernel_backends

from dreamportrait import ops
from dreamportrait.ops import composite_rays, gated_cross_attention, triplane_sample

BACKENDS = [pytest.param("reference", "cpu", id="reference"), *kernel_backends()]


def triplane_case(device):
    planes = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64, device=device)
    points = (torch.rand(2, 7, 3, dtype=torch.float64, device=device) - 0.5) * 0.9
    return (planes, points), lambda backend, planes, points: triplane_sample(planes, points, 1.0, backend=backend)


def composite_case(device):
    densities = torch.rand(3, 6, dtype=torch.float64, device=device) * 2
    colors = torch.randn(3, 6, 4, dtype=torch.float64, device=device)
    depths = torch.sort(torch.rand(3, 6, dtype=torch.float64, device=device) * 3, dim=-1).values
    deltas = torch.rand(3, 6, dtype=torch.float64, device=device) * 0.5
    return (densities, colors, depths, deltas), lambda backend, *x: composite_rays(*x, backend=backend)


def attention_case(device):
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64, device=device)
    k = torch.randn(2, 2, 3, 4, dtype=torch.float64, device=device)
    v = torch.randn(2, 2, 3, 4, dtype=torch.float64, device=device)
    gate = torch.randn(2, dtype=torch.float64, device=device)
    return (q, k, v, gate), lambda backend, *x: gated_cross_attention(*x, backend=backend)


def decode_case(device):
    planes = torch.randn(1, 3, 4, 5, 5, dtype=torch.float64, device=device)
    points = (torch.rand(1, 6, 3, dtype=torch.float64, device=device) - 0.5) * 0.9
    weight1, bias1 = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    weight2, bias2 = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    inputs = (planes, points, weight1.to(device), bias1.to(device), weight2.to(device), bias2.to(device))
    return inputs, lambda backend, p, x, w1, b1, w2, b2: ops.sample_and_decode(p, x, 1.0, w1, b1, w2, b2,
                                                                               backend=backend)


CASES = {"triplane_sample": triplane_case, "composite_rays": composite_case,
         "gated_cross_attention": attention_case, "sample_and_decode": decode_case}


def loss_of(outputs, seeds):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum((output * seed).sum() for output, seed in zip(outputs, seeds))


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_each_inputs_gradient_alone_equals_its_gradient_with_all(op, backend, device):
    if not hasattr(ops, op):
        pytest.skip(f"this build has no {op}")
    inputs, call = CASES[op](device)
    reference_inputs = [x.clone().requires_grad_(True) for x in inputs]
    reference_out = call("reference", *reference_inputs)
    outs = reference_out if isinstance(reference_out, tuple) else (reference_out,)
    seeds = [torch.randn_like(out) for out in outs]
    expected = torch.autograd.grad(loss_of(reference_out, seeds), reference_inputs)
    for index in range(len(inputs)):
        alone = [x.clone().requires_grad_(i == index) for i, x in enumerate(inputs)]
        out = call(backend, *alone)
        loss_of(out, seeds).backward()
        assert alone[index].grad is not None, index
        torch.testing.assert_close(alone[index].grad, expected[index], rtol=1e-7, atol=1e-9, msg=f"input {index}")
        assert all(x.grad is None for i, x in enumerate(alone) if i != index)
    # No input requiring a gradient: the outputs do not require one either.
    out = call(backend, *[x.clone() for x in inputs])
    assert not any(o.requires_grad for o in (out if isinstance(out, tuple) else (out,)))
