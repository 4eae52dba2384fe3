"""Training checkpoints' files with small stand-in networks: which file holds what, the ``latest``
pointer, how many are kept, leftovers of killed writes, and loading (the trainer's own checkpoints
and resuming: test_checkpoint.py)."""

import json
import shutil
import warnings

import pytest
import torch
import yaml
from torch import nn

from dreamportrait._manifest import write_manifest
from dreamportrait.training import checkpoint as ckpt

FILES = ["config.json", "discriminator.safetensors", "generator.safetensors", "generator_raw.safetensors",
         "manifest.json", "train_config.yaml", "training_state.pt"]


class Net(nn.Module):
    """A stand-in with what save_pretrained reads: constructor kwargs and a rendering resolution."""

    def __init__(self, fill, **init_kwargs):
        super().__init__()
        self.layer = nn.Linear(2, 3)
        nn.init.constant_(self.layer.weight, fill)
        nn.init.constant_(self.layer.bias, -fill)
        self.init_kwargs = init_kwargs
        self.neural_rendering_resolution = 16


def nets():
    return Net(1.0, z_dim=4), Net(2.0, z_dim=4), Net(3.0, c_dim=25)


def save(out, step, keep=3, state=None, config=None):
    generator, ema, discriminator = nets()
    return ckpt.save_checkpoint(out, step, generator, ema, discriminator, state or {"step": step},
                                config or {"steps": 10, "out_dir": str(out)}, keep=keep)


def fill_of(module):
    return module.layer.weight.unique().item()


def test_a_checkpoint_holds_each_network_its_state_and_configuration(tmp_path):
    state = {"step": 42, "rng": torch.arange(5), "skipped": 1}
    config = {"steps": 10, "gan": {"weight": 0.1}, "out_dir": "x", "a": 1}
    path = save(tmp_path, 42, state=state, config=config)
    assert path == tmp_path / "checkpoints" / "step-0000042"
    assert sorted(p.name for p in path.iterdir()) == FILES
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000042\n"
    # The configuration in its own key order.
    assert (path / "train_config.yaml").read_text() == yaml.safe_dump(config, sort_keys=False)
    assert list(yaml.safe_load((path / "train_config.yaml").read_text())) == ["steps", "gan", "out_dir", "a"]
    # The pretrained part: the EMA generator is "generator", with the discriminator's kwargs.
    saved = json.loads((path / "config.json").read_text())
    assert saved["generator"] == {"z_dim": 4, "neural_rendering_resolution": 16}
    assert saved["discriminator"] == {"c_dim": 25}
    generator, ema, discriminator = Net(0.0), Net(0.0), Net(0.0)
    loaded = ckpt.load_checkpoint(path, generator, ema, discriminator)
    assert (fill_of(generator), fill_of(ema), fill_of(discriminator)) == (1.0, 2.0, 3.0)
    assert loaded["step"] == 42 and loaded["skipped"] == 1 and torch.equal(loaded["rng"], torch.arange(5))
    assert json.loads((path / "manifest.json").read_text())["files"].keys() == set(FILES) - {"manifest.json"}


def test_networks_given_as_none_are_not_loaded(tmp_path):
    path = save(tmp_path, 1)
    ema = Net(0.0)
    assert ckpt.load_checkpoint(path, None, ema, None) == {"step": 1}
    assert fill_of(ema) == 2.0


def test_the_newest_keep_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 10, 11):
        save(tmp_path, step, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000010", "step-0000011"]
    save(tmp_path, 12, keep=1)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000012"]
    for step in (13, 14, 15, 16):
        save(tmp_path, step, keep=0)  # 0 keeps every one
    assert len(list(root.glob("step-*"))) == 5
    save(tmp_path, 17, keep=-1)  # as 0
    assert len(list(root.glob("step-*"))) == 6
    save(tmp_path, 18, keep=3)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000016", "step-0000017", "step-0000018"]
    assert (root / "latest").read_text() == "step-0000018\n"


def test_saving_a_step_again_replaces_it(tmp_path):
    save(tmp_path, 5, state={"step": 5, "version": 1})
    (tmp_path / "checkpoints" / "step-0000005" / "stray").write_text("from before")
    path = save(tmp_path, 5, state={"step": 5, "version": 2})
    assert sorted(p.name for p in path.iterdir()) == FILES
    assert ckpt.load_checkpoint(path, None, None, None)["version"] == 2


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_directory(tmp_path, monkeypatch):
    save(tmp_path, 1)
    root = tmp_path / "checkpoints"

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # not an Exception: cleaned up all the same

    monkeypatch.setattr(ckpt, "write_manifest", fail)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]
    assert (root / "latest").read_text() == "step-0000001\n"


def test_leftovers_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    ckpt.remove_partial_checkpoints(tmp_path)  # no checkpoint directory: nothing to do
    assert not (tmp_path / "checkpoints").exists()
    save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    (root / ".step-0000002.ab12.tmp").mkdir()
    (root / ".step-0000002.ab12.tmp" / "generator.safetensors").write_bytes(b"partial")
    (root / ".latest.cd34.tmp").write_text("step-00")
    for keep in (".keep-me", "notes.tmp", ".other.tmp"):
        (root / keep).write_text("not ours")
    ckpt.remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [".keep-me", ".other.tmp", "latest", "notes.tmp", "step-0000001"]


def test_the_latest_checkpoint(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None  # no checkpoint directory
    root = tmp_path / "checkpoints"
    root.mkdir()
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (3, 20, 7):
        save(tmp_path, step, keep=0)
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-0000007"  # the one latest names
    (root / "latest").unlink()
    # Without a pointer: the newest complete one; names that are not checkpoints, files and links are not.
    (root / "step-0000099").write_text("a file")
    (root / "step-00000100").mkdir()
    (root / "step-100").mkdir()
    (root / "step-0000098").symlink_to(root / "step-0000003")
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-0000020"
    # A pointer to one that is gone: the newest with a warning, or None when none is left.
    (root / "latest").write_text("step-0000050\n")
    with pytest.warns(UserWarning, match=r"latest names step-0000050, which does not exist; using the newest "
                                         r"checkpoint, step-0000020$"):
        assert ckpt.latest_checkpoint(tmp_path) == root / "step-0000020"
    for step in (3, 7, 20):
        shutil.rmtree(root / f"step-{step:07d}")
    with pytest.warns(UserWarning, match=r"names step-0000050, which does not exist; starting from scratch$"):
        assert ckpt.latest_checkpoint(tmp_path) is None


def test_latest_naming_a_link_or_another_name_is_refused(tmp_path):
    save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    (root / "step-0000002").symlink_to(root / "step-0000001")
    (root / "latest").write_text("step-0000002")
    with pytest.raises(ValueError, match=r"latest names .*step-0000002, a symbolic link: checkpoints must be "
                                         r"directories in"):
        ckpt.latest_checkpoint(tmp_path)
    (root / "latest").write_text("x" * 300)
    with pytest.raises(ValueError, match=r"latest names '" + "x" * 100 + r"', not a checkpoint of this run "
                                         r"\(step-NNNNNNN in "):
        ckpt.latest_checkpoint(tmp_path)
    (root / "latest").write_bytes(b"step-0000001\xff")
    with pytest.raises(ValueError, match="not a checkpoint of this run"):
        ckpt.latest_checkpoint(tmp_path)


def test_pretrained_directory_is_a_model_directory_or_a_runs_newest_checkpoint(tmp_path):
    path = save(tmp_path / "run", 4)
    assert ckpt.pretrained_directory(path) == path
    assert ckpt.pretrained_directory(str(tmp_path / "run")) == path
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^--checkpoint .*empty: neither a model directory \(config.json\) "
                                                r"nor a training run with checkpoints$"):
        ckpt.pretrained_directory(tmp_path / "empty")


def test_loading_checks_the_manifest_and_the_required_files(tmp_path):
    path = save(tmp_path, 1)
    (path / "generator_raw.safetensors").unlink()
    write_manifest(path)  # a consistent manifest without the raw weights
    with pytest.raises(ValueError, match="generator_raw.safetensors"):
        ckpt.load_checkpoint(path, None, None, None)
    path = save(tmp_path, 2)
    (path / "training_state.pt").write_bytes(b"not a torch file")
    write_manifest(path)
    with pytest.raises(ValueError, match=r"^checkpoint file .*training_state.pt is damaged: "):
        ckpt.load_checkpoint(str(path), None, None, None)
    path = save(tmp_path, 3, state={"step": 3, "module": nn.Linear(1, 1)})  # not loadable with weights_only
    with pytest.raises(ValueError, match="training_state.pt is damaged"):
        ckpt.load_checkpoint(path, None, None, None)


def test_the_training_state_is_loaded_onto_the_cpu(tmp_path, monkeypatch):
    path = save(tmp_path, 1)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.load_checkpoint(path, None, None, None)
    assert calls == [{"map_location": "cpu", "weights_only": True}]


def test_three_checkpoints_are_kept_by_default(tmp_path):
    generator, ema, discriminator = nets()
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, generator, ema, discriminator, {"step": step}, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == \
        ["step-0000003", "step-0000004", "step-0000005"]


def test_a_checkpoint_is_written_in_a_hidden_temporary_directory_named_after_it(tmp_path, monkeypatch):
    written = []
    real_write_manifest = ckpt.write_manifest

    def recording(directory):
        written.append(directory)
        return real_write_manifest(directory)

    monkeypatch.setattr(ckpt, "write_manifest", recording)
    path = save(tmp_path, 12)
    (directory,) = written
    assert directory.parent == tmp_path / "checkpoints" and directory.name.startswith(".step-0000012.")
    assert directory.name.endswith(".tmp") and not directory.exists() and path.is_dir()
