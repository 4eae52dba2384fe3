"""The GAN regulariser's real images (EG3D's dataset layout) against hand-made folders: flat-coloured
images, so every resize keeps a known value and each drawn image names the file it came from."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from dreamportrait.training.real_images import ImageFolder

# One grey level per image: image k has pixel value LEVELS[k] in every channel (unless written otherwise).
LEVELS = [0, 51, 102, 153, 204, 255]


def label(k):
    return [float(k) + i / 100 for i in range(25)]


def write_folder(directory, levels=LEVELS, groups=None, size=8, modes=None):
    """Flat images ``directory/img/k.png`` of ``levels[k]`` with label ``label(k)``; ``modes[k]`` "L"
    writes a greyscale image, "RGBA" one with an alpha channel of 7 (to be ignored)."""
    (directory / "img").mkdir(parents=True)
    entries = []
    for k, level in enumerate(levels):
        mode = (modes or {}).get(k, "RGB")
        if mode == "L":
            pixels = np.full((size, size), level, np.uint8)
        elif mode == "RGBA":
            pixels = np.concatenate([np.full((size, size, 3), level, np.uint8), np.full((size, size, 1), 7, np.uint8)], -1)
        else:
            pixels = np.full((size, size, 3), level, np.uint8)
        iio.imwrite(directory / f"img/{k}.png", pixels)
        entries.append([f"img/{k}.png", label(k)])
    listing = {"labels": entries} if groups is None else {"labels": entries, "groups": groups}
    (directory / "dataset.json").write_text(json.dumps(listing))
    return directory


def which(images):
    """The image index each sample shows (by its flat value ``level / 127.5 - 1``)."""
    values = [level / 127.5 - 1 for level in LEVELS]
    found = []
    for image in images:
        assert torch.allclose(image, image.flatten()[0].expand_as(image), atol=1e-5), "not flat"
        found.append(min(range(len(values)), key=lambda k: abs(values[k] - image.flatten()[0].item())))
        assert abs(values[found[-1]] - image.flatten()[0].item()) < 1e-5
    return found


def test_samples_are_the_drawn_files_in_minus_one_to_one_at_both_resolutions_with_their_labels(tmp_path):
    folder = ImageFolder(write_folder(tmp_path / "faces"), resolution=12, raw_resolution=4)
    assert len(folder) == 6
    images, labels = folder.sample(9, torch.Generator().manual_seed(3))
    expected = torch.randint(6, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    assert images["image"].shape == (9, 3, 12, 12) and images["image_raw"].shape == (9, 3, 4, 4)
    assert which(images["image"]) == expected and which(images["image_raw"]) == expected
    assert labels.dtype == torch.float32
    assert torch.equal(labels, torch.tensor([label(k) for k in expected], dtype=torch.float32))
    # 0 -> -1 and 255 -> 1 exactly.
    black, white = LEVELS.index(0), LEVELS.index(255)
    assert torch.equal(folder._load(black), torch.full((3, 12, 12), -1.0))
    assert torch.equal(folder._load(white), torch.full((3, 12, 12), 1.0))


def test_greyscale_images_fill_three_channels_and_alpha_is_dropped(tmp_path):
    folder = ImageFolder(write_folder(tmp_path / "faces", modes={1: "L", 2: "RGBA"}), 8, 8)
    for k in (1, 2):
        image = folder._load(k)
        assert image.shape == (3, 8, 8)
        assert torch.allclose(image, torch.full((3, 8, 8), LEVELS[k] / 127.5 - 1))


def test_resizes_are_bilinear_and_antialiased(tmp_path):
    directory = tmp_path / "faces"
    (directory / "img").mkdir(parents=True)
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:, 4:] = 255  # left half black, right half white
    iio.imwrite(directory / "img/0.png", pixels)
    (directory / "dataset.json").write_text(json.dumps({"labels": [["img/0.png", label(0)]]}))
    # Halving with antialiasing: a triangle filter two input pixels wide each side of the output
    # pixel's centre; output pixel 1 (centre 3.0) weighs input pixels 1-4 by 1/4, 3/4, 3/4, 1/4 (sum 2),
    # so it is (1/4 * white) / 2 = 1/8 of the way from black to white: -1 + 2/8 = -0.75.
    halved = torch.tensor([-1.0, -0.75, 0.75, 1.0])
    folder = ImageFolder(directory, resolution=4, raw_resolution=4)
    assert torch.allclose(folder._load(0), halved.expand(3, 4, 4), atol=1e-6)
    # The raw image is resized from the full-resolution one, with antialiasing too.
    images, _ = ImageFolder(directory, resolution=8, raw_resolution=4).sample(1)
    assert torch.allclose(images["image"], torch.tensor([-1.0] * 4 + [1.0] * 4).expand(1, 3, 8, 8))
    assert torch.allclose(images["image_raw"], halved.expand(1, 3, 4, 4), atol=1e-6)


def test_grouped_samples_are_member_major_distinct_members_of_one_group(tmp_path):
    groups = [[0, 1, 2], [3, 4], [5, 0]]
    folder = ImageFolder(write_folder(tmp_path / "faces", groups=groups), 4, 4)
    for seed in range(5):
        images, labels = folder.sample(8, torch.Generator().manual_seed(seed), group_size=2)
        drawn = which(images["image"])
        assert torch.equal(labels, torch.tensor([label(k) for k in drawn], dtype=torch.float32))
        for g in range(4):  # image i is in group i % 4
            members = [drawn[g], drawn[g + 4]]
            assert members[0] != members[1]
            assert any(set(members) <= set(group) for group in groups), (seed, drawn)
    # Groups of three: only the first group has as many members; each draw is a permutation of it.
    images, _ = folder.sample(6, torch.Generator().manual_seed(0), group_size=3)
    drawn = which(images["image"])
    assert sorted(drawn[0::2]) == [0, 1, 2] and sorted(drawn[1::2]) == [0, 1, 2]


def test_grouped_draws_follow_the_given_generator(tmp_path):
    groups = [[0, 1, 2, 3], [4, 5]]
    folder = ImageFolder(write_folder(tmp_path / "faces", groups=groups), 4, 4)
    generator = torch.Generator().manual_seed(11)
    images, _ = folder.sample(4, generator, group_size=2)
    # The same draws, restated: a group per pair, then a random order of its members, first two kept.
    replay = torch.Generator().manual_seed(11)
    chosen = [groups[int(i)] for i in torch.randint(2, (2,), generator=replay)]
    members = [[group[int(j)] for j in torch.randperm(len(group), generator=replay)[:2]] for group in chosen]
    assert which(images["image"]) == [members[0][0], members[1][0], members[0][1], members[1][1]]


def test_group_errors_are_named(tmp_path):
    folder = ImageFolder(write_folder(tmp_path / "faces", groups=[[0, 1]]), 4, 4)
    with pytest.raises(ValueError, match=r"^count \(5\) must be a multiple of group_size \(2\)$"):
        folder.sample(5, group_size=2)
    with pytest.raises(ValueError, match=r"^\S*faces/dataset.json has no 'groups' of 3 or more images, which "
                                         r"gan.group_size=3 needs$"):
        folder.sample(6, group_size=3)
    # A group of exactly the size is enough.
    images, _ = folder.sample(4, group_size=2)
    assert sorted(which(images["image"])) == [0, 0, 1, 1]


@pytest.mark.parametrize("groups", ["0,1", [[0]], [[0, 6]], [[0, -1]], [[0, True]], [[0, 1.0]], [[0, 1], 2], {"a": [0, 1]}])
def test_bad_groups_are_refused(tmp_path, groups):
    with pytest.raises(ValueError, match=r"^\S*faces/dataset.json: 'groups' must be a list of lists of at least 2 "
                                         r"image indices \(0 to 5\)$"):
        ImageFolder(write_folder(tmp_path / "faces", groups=groups), 4, 4)


def test_valid_groups_at_the_edges_are_accepted(tmp_path):
    folder = ImageFolder(write_folder(tmp_path / "faces", groups=[[0, 5], [5, 4, 3]]), 4, 4)
    assert folder.groups == [[0, 5], [5, 4, 3]]
    assert ImageFolder(write_folder(tmp_path / "plain"), 4, 4).groups == []


def test_folder_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^gan.image_dir .*nowhere: dataset.json is missing$"):
        ImageFolder(tmp_path / "nowhere", 4, 4)
    directory = write_folder(tmp_path / "faces")
    listing = json.loads((directory / "dataset.json").read_text())
    for labels in ([], None):
        (directory / "dataset.json").write_text(json.dumps({"labels": labels}))
        with pytest.raises(ValueError, match=r"dataset.json: 'labels' must list \[file name, 25-number camera label\] pairs"):
            ImageFolder(directory, 4, 4)
    short = [[name, values[:24]] for name, values in listing["labels"]]
    (directory / "dataset.json").write_text(json.dumps({"labels": short}))
    with pytest.raises(ValueError, match=r"the label of img/0.png has 24 numbers, expected 25"):
        ImageFolder(directory, 4, 4)
    missing = listing["labels"] + [["img/9.png", label(9)]]
    (directory / "dataset.json").write_text(json.dumps({"labels": missing}))
    with pytest.raises(FileNotFoundError, match=r"lists img/9.png, which does not exist"):
        ImageFolder(directory, 4, 4)


def test_group_spread_is_the_mean_difference_of_real_groups(tmp_path):
    # Groups of two images of levels a and b differ by |a - b| / 127.5 everywhere.
    folder = ImageFolder(write_folder(tmp_path / "faces", groups=[[0, 5]]), 8, 4)
    assert folder.group_spread(2, groups=3) == pytest.approx(255 / 127.5)
    folder = ImageFolder(write_folder(tmp_path / "mixed", groups=[[1, 2], [3, 5]]), 8, 4)
    spread = folder.group_spread(2, groups=16, generator=torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)
    picks = torch.randint(2, (16,), generator=replay).tolist()
    gaps = [51 / 127.5 if pick == 0 else 102 / 127.5 for pick in picks]
    assert spread == pytest.approx(sum(gaps) / 16)
    assert 0 < picks.count(0) < 16  # both groups drawn


def test_integer_labels_are_read_as_float32(tmp_path):
    directory = write_folder(tmp_path / "faces", levels=[0, 255])
    listing = json.loads((directory / "dataset.json").read_text())
    listing["labels"] = [[name, list(range(25))] for name, _ in listing["labels"]]
    (directory / "dataset.json").write_text(json.dumps(listing))
    folder = ImageFolder(directory, 4, 4)
    assert folder.labels.dtype == torch.float32
    assert torch.equal(folder.labels, torch.arange(25, dtype=torch.float32).expand(2, 25))


def test_group_spread_measures_64_groups_by_default(tmp_path, monkeypatch):
    folder = ImageFolder(write_folder(tmp_path / "faces", groups=[[0, 5]]), 8, 4)
    counts = []
    sample = folder.sample

    def recording_sample(count, generator=None, group_size=1):
        counts.append((count, group_size))
        return sample(count, generator, group_size=group_size)

    monkeypatch.setattr(folder, "sample", recording_sample)
    folder.group_spread(2)
    assert counts == [(128, 2)]
