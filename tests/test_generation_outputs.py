"""What people look at, pinned: each cell of grid.png is the view file written for that seed and
view, a seed always draws the same latent (the documented seed -> latent mapping), and the image,
grid and depth encodings follow their closed forms."""

import hashlib
import math
import re
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from dreamportrait.generation import (TRUNCATION_PSI, forward_pass, frontal_camera, generate, orbit, parse_seeds,
                                      render_views, sample)
from dreamportrait.models import TextConditionedGenerator, TextEncoder, build_generator, view_cameras
from dreamportrait.outputs import depth_grey, depth_to_uint8, grid, slug, to_uint8, write_image, write_video

# torch's CPU generator (MT19937) seeded with 0 and 1: the first of the standard normals it draws for a
# vector of 16 or more (torch's vectorised Box-Muller; shorter draws give other numbers).
FIRST_NORMALS = {0: [-1.1258398, -1.1523602, -0.2505786, -0.4338788],
                 1: [-1.5255959, -0.7502318, -0.6539809, -1.6094848]}


@pytest.fixture(scope="module")
def generator(tiny_pixel_sd):
    torch.manual_seed(0)
    model = TextConditionedGenerator(build_generator("tiny", neural_rendering_resolution=16), 32,
                                     text_encoder=TextEncoder(tiny_pixel_sd), attention_resolutions=(16,),
                                     attention_heads=2, attention_head_dim=8)
    with torch.no_grad():  # a "trained" state: open gates and adapters
        model.cross_attention["16"].gate.fill_(1.0)
        for mlp in model.adapters.groups.values():
            mlp[2].weight.normal_(std=0.1)
    return model.eval()


def test_parse_seeds():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_seeds(" 5 , 2-2") == [5, 2]
    for bad in ("3-1", "a", "1-", "-2", ""):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_grid_places_image_i_at_row_i_div_columns_and_column_i_mod_columns():
    images = torch.rand(5, 3, 2, 4) * 2 - 1
    sheet = grid(images, 3)
    assert sheet.shape == (3, 2 * 2, 3 * 4)
    for index in range(6):
        row, column = divmod(index, 3)
        cell = sheet[:, row * 2:(row + 1) * 2, column * 4:(column + 1) * 4]
        expected = images[index] if index < 5 else torch.full((3, 2, 4), -1.0)  # a missing cell is black
        assert torch.equal(cell, expected), index
    assert torch.equal(grid(images, 1), torch.cat(list(images), dim=1))


def test_to_uint8_maps_minus_one_to_zero_and_one_to_255_rounding_to_nearest():
    values = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.0])
    image = values.view(1, 1, -1).expand(3, 1, -1)
    pixels = to_uint8(image)
    expected = np.round((np.clip(values.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8)
    assert pixels.shape == (1, 7, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[0, :, 0], expected) and list(expected[[0, 1, 5, 6]]) == [0, 0, 255, 255]
    rgb = torch.stack([torch.full((2, 2), -1.0), torch.zeros(2, 2), torch.ones(2, 2)])
    assert np.array_equal(to_uint8(rgb)[0, 0], [0, 128, 255])  # channels last, in order


def test_depth_encodings():
    depth = torch.tensor([[[2.0, 3.0], [2.5, float("nan")]]])
    pixels = depth_to_uint8(depth)
    assert np.array_equal(pixels, [[255, 0], [128, 0]])  # nearest white, farthest black, per image
    assert np.array_equal(depth_to_uint8(torch.full((1, 2, 2), 4.0)), np.full((2, 2), 0))
    grey = depth_grey(torch.tensor([[[[1.0, 3.0, 2.0, 0.0]]]]), near=1.0, far=3.0)
    assert grey.shape == (1, 3, 1, 4)
    assert torch.allclose(grey[0, 0, 0], torch.tensor([1.0, -1.0, 0.0, 1.0]))  # fixed scale, clamped


def test_slug():
    assert slug("A portrait of a Bald man, glasses!") == "a-portrait-of-a-bald-man-glasses"
    assert slug("!!!") == "empty-prompt"
    long_a, long_b = "x" * 70 + " a", "x" * 70 + " b"
    assert len(slug(long_a)) <= 60 and slug(long_a) != slug(long_b) and slug(long_a).startswith("x" * 50)


def test_each_grid_cell_is_the_view_file_of_its_seed_and_view(generator, tmp_path):
    seeds, views = [3, 0], 3
    result = generate(generator, ["a man"], seeds, tmp_path, views=views, progress=False)
    assert len(result.seconds_per_sample) == len(seeds)
    sheet = iio.imread(tmp_path / "a-man" / "grid.png")
    size = sheet.shape[0] // len(seeds)
    assert sheet.shape == (len(seeds) * size, views * size, 3)
    cells = {}
    for row, seed in enumerate(seeds):  # rows in the order the seeds were given, columns by view
        for column in range(views):
            view = iio.imread(tmp_path / "a-man" / f"seed{seed:04d}" / f"view{column:02d}.png")
            cell = sheet[row * size:(row + 1) * size, column * size:(column + 1) * size]
            assert np.array_equal(cell, view), (seed, column)
            cells[seed, column] = cell
            depth = iio.imread(tmp_path / "a-man" / f"seed{seed:04d}" / f"view{column:02d}_depth.png")
            assert depth.ndim == 2 and depth.max() == 255 and depth.min() == 0  # nearest white, farthest black
    # The cells differ between seeds and between views, so an order mix-up cannot pass.
    assert not np.array_equal(cells[3, 0], cells[0, 0]) and not np.array_equal(cells[3, 0], cells[3, 2])
    # The view files are the renders of the one forward pass of (prompt, seed).
    ws, sr_ws, planes = sample(generator, "a man", 3)
    cameras = view_cameras(views, math.radians(35.0), 2.7, (0, 0, 0.2), 18.837)
    images = render_views(generator, ws, sr_ws, planes, cameras)["image"]
    for column in range(views):
        assert np.array_equal(to_uint8(images[column]), cells[3, column])


def test_a_seed_draws_its_latent_from_torchs_cpu_generator_seeded_with_it(generator, monkeypatch):
    """seed s -> z = torch.randn(1, z_dim, generator=torch.Generator().manual_seed(s)) on the CPU,
    whatever the device and the global random state; the mapping is conditioned on the frontal
    camera and truncated with psi 0.7 (EG3D's generation scripts)."""
    drawn = []
    mapping = generator.mapping

    def spy(z, c, text, truncation_psi=1.0, **kwargs):
        drawn.append((z.clone(), c.clone(), truncation_psi))
        return mapping(z, c, text, truncation_psi=truncation_psi, **kwargs)

    monkeypatch.setattr(generator, "mapping", spy)
    for seed in (0, 1):
        torch.manual_seed(1234 + seed)  # the global state plays no part
        sample(generator, "a man", seed)
        z, c, psi = drawn[-1]
        assert z.shape == (1, generator.base.z_dim)
        assert torch.allclose(z[0, :4], torch.tensor(FIRST_NORMALS[seed]), atol=1e-6)
        assert torch.equal(z, torch.randn(1, generator.base.z_dim, generator=torch.Generator().manual_seed(seed)))
        assert torch.equal(c, frontal_camera(generator)) and psi == TRUNCATION_PSI == 0.7
    first = sample(generator, "a man", 5)[0]
    torch.manual_seed(99)
    assert torch.equal(sample(generator, "a man", 5)[0], first)


def test_seed_limits_and_messages():
    from dreamportrait.generation import MAX_SEEDS, SEED_LIMIT, check_seeds

    assert SEED_LIMIT == 2**32 and MAX_SEEDS == 10_000
    message = (r"^--seeds must look like 0-3,7: integers from 0 to 4294967295 and ranges of them, "
               r"at most 10000 seeds in all; got ")
    assert parse_seeds("4294967295") == [4294967295] and parse_seeds("1") == [1] and parse_seeds("0") == [0]
    assert len(parse_seeds("0-9999")) == MAX_SEEDS and len(parse_seeds("0-9998,3")) == MAX_SEEDS
    for bad in ("4294967296", "0-10000", "0-9998,3,4", "10-10010", "1-0", "x" * 150):
        with pytest.raises(ValueError, match=message + re.escape(repr(bad[:100])) + "$"):
            parse_seeds(bad)
    assert check_seeds((0, 4294967295)) == [0, 4294967295] and check_seeds([np.int64(3)]) == [3]
    for bad in ([], "12", b"1", 3, [True], [-1], [4294967296], [1.0], list(range(60))[::-1] + [-1]):
        with pytest.raises(ValueError, match=r"^seeds must be a non-empty list of integers from 0 to 4294967295, "
                                             r"got " + re.escape(str(bad)[:100]) + "$"):
            check_seeds(bad)


def test_depth_encodings_at_their_edges():
    assert np.array_equal(depth_to_uint8(torch.full((1, 2, 2), float("nan"))), np.zeros((2, 2)))  # nothing finite
    inf = depth_to_uint8(torch.tensor([[[1.0, float("inf")], [3.0, float("-inf")]]]))
    assert np.array_equal(inf, [[255, 0], [0, 255]])  # infinities clamp to the ends of the finite range
    grey = depth_grey(torch.tensor([[[[0.5, 4.0]]], [[[2.0, 1.0]]]]), near=1.0, far=3.0)
    assert grey.shape == (2, 3, 1, 2)
    assert torch.equal(grey[:, 0, 0], torch.tensor([[1.0, -1.0], [0.0, 1.0]]))  # beyond near/far: clamped


def test_the_one_forward_pass_renders_what_the_generators_own_forward_does(generator):
    """sample + render_views (planes computed once, reused for every view) equal the generator's
    forward for the same latent, prompt, truncation and frontal conditioning: the text reaches the
    planes (cross-attention) as well as the ws (adapters)."""
    seed, views = 2, 3
    cameras = view_cameras(views, math.radians(35.0), 2.7, (0, 0, 0.2), 18.837)
    with torch.no_grad():
        ws, sr_ws, planes = sample(generator, "a woman with red hair", seed)
        split = render_views(generator, ws, sr_ws, planes, cameras)["image"]
        z = torch.randn(1, generator.base.z_dim, generator=torch.Generator().manual_seed(seed)).expand(views, -1)
        whole = generator(z, cameras, prompts=["a woman with red hair"] * views, truncation_psi=TRUNCATION_PSI,
                          conditioning=frontal_camera(generator).expand(views, -1), noise_mode="const",
                          deterministic_sampling=True)["image"]
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)


def test_the_forward_pass_is_untruncated_unless_told(generator):
    z = torch.randn(2, generator.base.z_dim)
    conditioning = frontal_camera(generator).expand(2, -1)
    with torch.no_grad():
        text = generator.encode(["a man", "a woman with red hair"])
        planes = forward_pass(generator, z, conditioning, text)[2]
        whole = generator(z, conditioning, text=text, noise_mode="const", deterministic_sampling=True)["planes"]
        truncated = forward_pass(generator, z, conditioning, text, truncation_psi=0.5)[2]
    torch.testing.assert_close(planes, whole, rtol=0, atol=1e-6)
    assert not torch.allclose(truncated, planes, atol=1e-4)


def _with_rendering_options(options):
    return SimpleNamespace(base=SimpleNamespace(rendering_kwargs=options))


def test_the_orbit_is_the_generators_average_camera_and_ffhqs_without_one():
    assert orbit(_with_rendering_options({})) == (2.7, (0, 0, 0.2))  # EG3D's FFHQ orbit
    radius, pivot = orbit(_with_rendering_options({"avg_camera_radius": 3, "avg_camera_pivot": [0.1, -0.2, 0.3]}))
    assert (radius, pivot) == (3.0, (0.1, -0.2, 0.3)) and type(radius) is float
    # The frontal camera sits on that orbit (a sphere about the world origin, EG3D's LookAtPoseSampler) on
    # the +z axis, looking at the pivot, with FFHQ's focal length 1 / (tan(18.837° / 2) · 1.414) = 4.2634.
    label = frontal_camera(_with_rendering_options({"avg_camera_radius": 3.5, "avg_camera_pivot": [0.1, -0.2, 0.3]}))
    assert label.shape == (1, 25)
    cam2world = label[0, :16].view(4, 4).double()
    forward = np.array([0.1, -0.2, 0.3 - 3.5]) / np.linalg.norm([0.1, -0.2, 0.3 - 3.5])
    torch.testing.assert_close(cam2world[:3, 3], torch.tensor([0.0, 0.0, 3.5], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(cam2world[:3, 2], torch.from_numpy(forward), atol=1e-5, rtol=0)
    focal = 1 / (math.tan(math.radians(18.837) / 2) * 1.414)
    torch.testing.assert_close(label[0, 16:].view(3, 3).double(),
                               torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1]], dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_slug_keeps_names_up_to_the_limit_and_cuts_longer_ones_to_it_with_a_hash():
    assert slug("x" * 60) == "x" * 60
    assert slug("x" * 61) == "x" * 51 + "-" + hashlib.sha1(b"x" * 61).hexdigest()[:8]
    assert slug("y" * 15, limit=14) == "yyyyy-" + hashlib.sha1(b"y" * 15).hexdigest()[:8]
    # A cut that ends on a separator drops it (one "-" before the hash), and only at the end.
    text = "a" * 50 + " " + "b" * 20
    assert slug(text) == "a" * 50 + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    assert len(slug("c" * 30 + " " + "d" * 30)) == 60


def test_depth_grey_keeps_every_pixel():
    depth = torch.tensor([[[[1.0, 1.5], [2.5, 3.0]]]])  # (1, 1, 2, 2): near 1 white, far 3 black
    grey = depth_grey(depth, near=1.0, far=3.0)
    assert grey.shape == (1, 3, 2, 2)
    assert torch.equal(grey, torch.tensor([[1.0, 0.5], [-0.5, -1.0]]).expand(1, 3, 2, 2))


def test_write_image_writes_a_png_whatever_the_file_name(tmp_path):
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    path = write_image(tmp_path / "cell", pixels)
    assert path == tmp_path / "cell" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(iio.imread(path, extension=".png"), pixels)
    assert [p.name for p in tmp_path.iterdir()] == ["cell"]  # no temporary file left


def test_write_video_writes_h264_at_24_frames_per_second_at_the_frames_size(tmp_path):
    frames = [np.full((18, 22, 3), 40 * index, dtype=np.uint8) for index in range(5)]  # not multiples of 16
    path = write_video(tmp_path / "clip.mp4", frames)
    assert path == tmp_path / "clip.mp4" and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["codec"] == "h264" and meta["fps"] == 24.0 and meta["size"] == (22, 18)
    video = iio.imread(path, plugin="FFMPEG", index=None)
    assert video.shape == (5, 18, 22, 3)
    assert np.abs(video.astype(int) - np.stack(frames).astype(int)).max() <= 3  # flat frames, nearly lossless
    assert write_video(tmp_path / "slow.mp4", frames, fps=10) and iio.immeta(tmp_path / "slow.mp4",
                                                                             plugin="FFMPEG")["fps"] == 10.0
