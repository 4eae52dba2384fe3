"""Gradient averaging across processes for every network the trainer updates: the generator
(DistributedDataParallel: test_trainer) and the discriminator (averaged by hand), and the
all-or-nothing skip of a step that is non-finite on any process. Two CPU processes over gloo."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dreamportrait.training import Trainer, load_config

PROMPTS = '["a portrait of a bald man", "a woman with red hair"]'


def rank_gradients(rank):
    """What rank r's backward leaves: a weight gradient (r + 1) * base, a bias gradient that is zero on rank 1."""
    base = torch.arange(6.0).view(2, 3) - 2.5
    return (rank + 1) * base, (torch.tensor([1.0, -2.0]) if rank == 0 else torch.zeros(2))


def _worker(rank, world, port, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trainer = Trainer.__new__(Trainer)
    trainer.world = world
    layer = nn.Linear(3, 2)
    layer.weight.grad, layer.bias.grad = rank_gradients(rank)
    trainer._average_gradients(layer.parameters())
    finite_everywhere = trainer._finite(torch.tensor(1.0), layer.parameters())
    layer.weight.grad[0, 0] = float("nan") if rank == 1 else 0.0
    finite_with_one_nan = trainer._finite(torch.tensor(1.0), [layer.weight])
    if rank == 0:
        torch.save({"weight": layer.weight.grad.clone(), "bias": layer.bias.grad.clone(),
                    "finite": finite_everywhere, "finite_with_one_nan": finite_with_one_nan}, result)
    dist.destroy_process_group()


def test_discriminator_gradients_are_averaged_over_processes_and_a_non_finite_rank_skips_everyone(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, port, result), nprocs=2, join=True)
    got = torch.load(result, weights_only=True)
    weight = (rank_gradients(0)[0] + rank_gradients(1)[0]) / 2  # 1.5 * base
    expected_weight = weight.clone()
    expected_weight[0, 0] = 0.0  # set after averaging, on rank 0
    assert torch.equal(got["weight"], expected_weight)
    assert torch.equal(got["bias"], torch.tensor([0.5, -1.0]))
    assert got["finite"] is True and got["finite_with_one_nan"] is False


def test_the_trainer_averages_the_discriminators_gradients_every_step(tiny_latent_sd, tmp_path, monkeypatch):
    config = load_config(None, [
        f"guidance.source={tiny_latent_sd}", f"out_dir={tmp_path}", f"prompts={PROMPTS}", "steps=1", "batch_size=2",
        "model.neural_rendering_resolution=16", "model.attention_head_dim=8", "model.attention_heads=2",
        "log.tensorboard=false", "gan.r1_interval=1", "device=cpu"])
    trainer = Trainer(config)
    averaged = []

    def record(parameters):
        parameters = list(parameters)
        averaged.append(parameters)
        assert all(p.grad is not None for p in parameters if p.requires_grad)  # after the backward, before the step

    monkeypatch.setattr(trainer, "_average_gradients", record)
    trainer.train_step()
    assert len(averaged) == 1
    assert {id(p) for p in averaged[0]} == {id(p) for p in trainer.discriminator.parameters()}
