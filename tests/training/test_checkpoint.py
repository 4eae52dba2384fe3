"""Checkpoints: verified on load, confined to their run, cleaned up after kills, resumed exactly."""

import json
import os
import shutil
import signal
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from test_trainer import make_config
from tiny_models import write_tiny_stable_diffusion

from dreamportrait._atomic import atomic_path, temporary_directory
from dreamportrait.cli import main
from dreamportrait.training import Trainer, latest_checkpoint
from dreamportrait.training import checkpoint as checkpoint_module


@pytest.fixture(scope="module")
def phrase_sd(tmp_path_factory):
    """A tiny latent Stable Diffusion whose text encoder encodes prompts phrase by phrase, as the
    world's teacher does (batches are then padded to their longest prompt)."""
    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("phrase-sd"), text_encoding="phrases")


@pytest.fixture(scope="module")
def saved_run(tiny_latent_sd, tmp_path_factory):
    """A run directory with one checkpoint (step 1), and a trainer of the same configuration."""
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(make_config(tiny_latent_sd, out, "steps=1"))
    trainer.train()
    return out, trainer


def copy_run(saved_run, tmp_path):
    out, trainer = saved_run
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run", trainer


def flip(path, offset, count):
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(255 - b for b in data[offset:offset + count])
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_an_error_naming_the_file(saved_run, tmp_path):
    run, trainer = copy_run(saved_run, tmp_path)
    checkpoint = run / "checkpoints" / "step-0000001"
    pristine = tmp_path / "pristine"
    shutil.copytree(checkpoint, pristine)

    def damage(name, how):
        shutil.rmtree(checkpoint)
        shutil.copytree(pristine, checkpoint)
        how(checkpoint / name)

    tensor_region = lambda path: flip(path, path.stat().st_size // 2, 64)  # noqa: E731 (past the header)
    cases = [("training_state.pt", tensor_region, "training_state.pt is damaged"),
             ("generator_raw.safetensors", tensor_region, "generator_raw.safetensors is damaged"),
             ("discriminator.safetensors", lambda path: path.write_bytes(path.read_bytes()[:-1]),
              "discriminator.safetensors is damaged: .* bytes"),
             ("config.json", lambda path: path.write_text("{not json"), "config.json is damaged"),
             ("discriminator.safetensors", lambda path: path.unlink(), "discriminator.safetensors is missing"),
             ("manifest.json", lambda path: path.unlink(), "manifest.json is missing"),
             ("manifest.json", lambda path: path.write_text("[]"), "manifest.json is damaged")]
    for name, how, message in cases:
        damage(name, how)
        with pytest.raises(ValueError, match=message):
            trainer.resume(checkpoint)
    # The intact checkpoint still loads.
    damage("config.json", lambda path: None)
    assert trainer.resume(checkpoint) and trainer.step == 1


def test_the_cli_reports_a_damaged_checkpoint_in_one_line(saved_run, tmp_path, tiny_latent_sd, capsys):
    run, _ = copy_run(saved_run, tmp_path)
    checkpoint = run / "checkpoints" / "step-0000001"
    flip(checkpoint / "generator.safetensors", 8192, 4096)
    capsys.readouterr()
    status = main(["generate", "--checkpoint", str(run), "--prompt", "a bald man", "--seeds", "0", "--views", "1",
                   "--out", str(tmp_path / "out")])
    assert status == 2 and not (tmp_path / "out").exists()
    assert "generator.safetensors is damaged" in error_line(capsys, "generate")
    (checkpoint / "discriminator.safetensors").unlink()
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"guidance": {"source": str(tiny_latent_sd)}}))
    status = main(["train", str(config), *[f"{key}={value}" for key, value in (
        ("out_dir", run), ("prompts", '["a bald man"]'), ("steps", 2), ("batch_size", 2), ("device", "cpu"),
        ("model.neural_rendering_resolution", 16), ("log.tensorboard", "false"))]])
    assert status == 1 and "discriminator.safetensors is missing" in error_line(capsys, "train")


def error_line(capsys, command):
    """The one line a CLI command wrote about its error (beside progress bars), without a traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"dreamportrait {command}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("pointer", ["../../elsewhere", "/tmp", "step-1", "step-0000001/..", ""])
def test_latest_must_name_a_checkpoint_of_the_run(saved_run, tmp_path, pointer):
    run, _ = copy_run(saved_run, tmp_path)
    (run / "checkpoints" / "latest").write_text(pointer + "\n")
    with pytest.raises(ValueError, match="not a checkpoint of this run"):
        latest_checkpoint(run)


def test_latest_may_not_lead_out_through_a_link_and_a_missing_one_falls_back_with_a_warning(saved_run, tmp_path):
    run, _ = copy_run(saved_run, tmp_path)
    root = run / "checkpoints"
    shutil.copytree(root / "step-0000001", tmp_path / "elsewhere")
    (root / "step-0000002").symlink_to(tmp_path / "elsewhere")
    (root / "latest").write_text("step-0000002\n")
    with pytest.raises(ValueError, match="symbolic link"):
        latest_checkpoint(run)
    (root / "step-0000002").unlink()
    with pytest.warns(UserWarning, match="names step-0000002, which does not exist; using the newest checkpoint, "
                                         "step-0000001"):
        assert latest_checkpoint(run) == root / "step-0000001"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_follow_the_umask(saved_run, tmp_path, umask):
    _, trainer = saved_run
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "file.txt") as temporary:
            temporary.write_text("x")
        directory = temporary_directory(tmp_path, prefix=".d.")
        trainer.config.out_dir = str(tmp_path / "run")
        checkpoint = trainer.save()
    finally:
        os.umask(previous)
    assert (tmp_path / "file.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask
    assert checkpoint.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in [*checkpoint.iterdir(), checkpoint.parent / "latest"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_leftovers_of_killed_writes_are_removed_when_the_run_starts(saved_run, tmp_path):
    run, trainer = copy_run(saved_run, tmp_path)
    root = run / "checkpoints"
    (root / ".step-0000002.3f9a.tmp").mkdir()
    (root / ".step-0000002.3f9a.tmp" / "generator.safetensors").write_bytes(b"partial")
    (root / ".latest.81c2.tmp").write_text("step-00")
    (root / ".keep-me").write_text("not ours")
    trainer.config.out_dir = str(run)
    trainer.train(steps=trainer.step)  # starts, has nothing to do
    assert sorted(path.name for path in root.iterdir()) == [".keep-me", "latest", "step-0000001"]


# --- killed and resumed ------------------------------------------------------------------------

class KillAt:
    """Kill points for a run in a forked process: SIGKILL, so nothing is cleaned up and no buffer
    is flushed, as when a job is killed."""

    @staticmethod
    def step(trainer, step):
        train_step = trainer.train_step

        def killing():
            if trainer.step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return train_step()
        trainer.train_step = killing

    @staticmethod
    def state_write(trainer, step):
        """Inside checkpoint ``step``'s write, once the training state is written (before its manifest)."""
        save = checkpoint_module.torch.save

        def killing(state, path):
            save(state, path)
            if state["step"] == step:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint_module.torch.save = killing

    @staticmethod
    def latest_write(trainer, step):
        """Once checkpoint ``step`` is in place, while ``latest`` is rewritten to name it."""
        real = checkpoint_module.atomic_path

        class Killing:
            def __init__(self, path):
                self.inner = real(path)

            def __enter__(self):
                temporary = self.inner.__enter__()
                if trainer.step == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return temporary

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)
        checkpoint_module.atomic_path = Killing


def run_until_killed(config, kill, step):
    """Start (resuming) the run in a child process and kill it at ``kill`` of ``step``."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            trainer = Trainer(config)
            trainer.resume()
            getattr(KillAt, kill)(trainer, step)
            trainer.train()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)  # reached only when the kill point was not
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at {kill} {step}"


def full_state(trainer):
    """Every tensor of the run: weights, EMA, optimiser states and random generators."""
    state = {f"{name}.{key}": value for name in ("generator", "generator_ema", "discriminator")
             for key, value in getattr(trainer, name).state_dict().items()}
    for name in ("g_optimizer", "d_optimizer"):
        for index, values in trainer.__dict__[name].state_dict()["state"].items():
            state.update({f"{name}.{index}.{key}": value for key, value in values.items()})
    state["rng.sampler"], state["rng.torch"] = trainer.sampler.get_state(), torch.get_rng_state()
    return state


def test_a_run_killed_again_and_again_ends_bit_identical_to_an_uninterrupted_one(phrase_sd, tmp_path):
    # One thread: the forked children must not start an OpenMP team, and CPU reductions sum in an
    # order that depends on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = ("steps=4", "checkpoint_every=1", "gan.r1_interval=2", "batch_size=2",
                  'prompts=["smiling", "glasses", "a bald man with red hair", "a woman with blond hair"]')
        straight = Trainer(make_config(phrase_sd, tmp_path / "straight", *common))
        straight.train()
        config = make_config(phrase_sd, tmp_path / "killed", *common)
        root = tmp_path / "killed" / "checkpoints"
        run_until_killed(config, "step", 2)  # after checkpoint 2, during step 3
        assert latest_checkpoint(config.out_dir).name == "step-0000002"
        run_until_killed(config, "state_write", 3)  # while writing checkpoint 3
        assert [path.name.startswith(".step-0000003.") for path in root.glob(".*")] == [True]
        run_until_killed(config, "latest_write", 3)  # checkpoint 3 in place, latest still naming 2
        assert (root / "latest").read_text() == "step-0000002\n" and (root / "step-0000003").is_dir()
        assert [path.name for path in root.glob(".*")] and not list(root.glob(".step-*"))
        resumed = Trainer(config)
        assert resumed.resume() and resumed.step == 2
        resumed.train()
        assert not list(root.glob(".*"))
    finally:
        torch.set_num_threads(threads)
    expected, actual = full_state(straight), full_state(resumed)
    assert expected.keys() == actual.keys()
    different = [name for name, value in expected.items() if not torch.equal(actual[name], value)]
    assert not different, f"{len(different)} of {len(expected)} tensors differ: {different[:5]}"


def _resume_worker(rank, world, port, sd, out_dir, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = make_config(sd, out_dir, "gan.weight=0", "steps=1", "checkpoint_every=1")
    trainer = Trainer(config)
    trainer.train()
    resumed = Trainer(config)
    assert resumed.resume() and resumed.step == 1
    torch.save({"saved": trainer.sampler.get_state(), "resumed": resumed.sampler.get_state(),
                "saved_torch": torch.get_rng_state()}, result_dir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_each_process_resumes_its_own_random_streams(tiny_latent_sd, tmp_path):
    # Under torchrun every process draws its own batches and noise: a resume that gave every process
    # rank 0's streams would train on one batch repeated world-size times.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_resume_worker, args=(2, port, tiny_latent_sd, tmp_path / "run", tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert not torch.equal(ranks[0]["saved"], ranks[1]["saved"])
    for rank, states in enumerate(ranks):
        assert torch.equal(states["resumed"], states["saved"]), f"rank {rank}"
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-0000001" / "training_state.pt", weights_only=True)
    assert [torch.equal(rng["sampler"], states["saved"]) for rng, states in zip(saved["rng"], ranks)] == [True, True]
    assert [torch.equal(rng["torch"], states["saved_torch"]) for rng, states in zip(saved["rng"], ranks)] == [True] * 2
    single = Trainer(make_config(tiny_latent_sd, tmp_path / "run", "gan.weight=0", "steps=1"))
    with pytest.warns(UserWarning, match="written by 2 process\\(es\\) and is resumed by 1"):
        single.resume()
    assert torch.equal(single.sampler.get_state(), ranks[0]["saved"])
