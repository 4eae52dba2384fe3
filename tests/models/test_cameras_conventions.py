"""EG3D's camera conventions at off-frontal poses, computed with numpy from EG3D's published
formulas (``LookAtPoseSampler``, ``create_cam2world_matrix``, ``FOV_to_intrinsics``, the pinhole
projection) and from hand-worked values, never with dreamportrait.models.cameras itself.

EG3D: yaw (``horizontal_mean``) is the azimuth around +y with pi/2 frontal (camera on +z);
pitch (``vertical_mean``) is the polar angle from +y mapped through ``arccos(1 - 2 v / pi)``;
``x = r sin(phi) cos(pi - yaw)``, ``y = r cos(phi)``, ``z = r sin(phi) sin(pi - yaw)``; the camera
looks at the pivot with OpenCV axes (x right, y down, z forward) and no roll.
"""

import math

import numpy as np
import pytest
import torch

from dreamportrait.models import cameras
from dreamportrait.models.cameras import (FRONTAL, camera_labels, camera_rays, fov_to_intrinsics, look_at, orbit_poses,
                                          sample_camera_labels, sample_orbit_angles, split_camera_labels,
                                          view_cameras)

PIVOT = np.array([0.0, 0.0, 0.2])


def eg3d_origin(yaw, pitch, radius):
    phi = np.arccos(1 - 2 * np.clip(pitch, 1e-5, np.pi - 1e-5) / np.pi)
    return radius * np.array([np.sin(phi) * np.cos(np.pi - yaw), np.cos(phi), np.sin(phi) * np.sin(np.pi - yaw)])


def eg3d_cam2world(origin, pivot):
    forward = (pivot - origin) / np.linalg.norm(pivot - origin)
    right = -np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    up = np.cross(forward, right)
    up /= np.linalg.norm(up)
    matrix = np.eye(4)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2], matrix[:3, 3] = right, up, forward, origin
    return matrix


def project(cam2world, intrinsics, point):
    """Pixel coordinates (u, v) in image widths of a world point (pinhole, OpenCV axes)."""
    world2cam = np.linalg.inv(cam2world)
    x, y, z = world2cam[:3, :3] @ point + world2cam[:3, 3]
    assert z > 0, "the point is behind the camera"
    u, v, w = intrinsics @ np.array([x / z, y / z, 1.0])
    return np.array([u, v]) / w


YAWS = [FRONTAL - 0.6, FRONTAL - 0.25, FRONTAL, FRONTAL + 0.3, FRONTAL + 0.7, FRONTAL + 1.2]
PITCHES = [FRONTAL - 0.3, FRONTAL, FRONTAL + 0.2]


@pytest.mark.parametrize("radius,pivot", [(2.7, (0.0, 0.0, 0.2)), (1.3, (0.1, -0.2, 0.05))])
def test_orbit_poses_match_eg3ds_look_at_pose_sampler_at_off_frontal_poses(radius, pivot):
    yaw, pitch = np.meshgrid(YAWS, PITCHES, indexing="ij")
    yaw, pitch = yaw.ravel(), pitch.ravel()
    poses = orbit_poses(torch.tensor(yaw), torch.tensor(pitch), radius, pivot).numpy()
    for pose, a, b in zip(poses, yaw, pitch):
        expected = eg3d_cam2world(eg3d_origin(a, b, radius), np.array(pivot))
        assert np.allclose(pose, expected, rtol=0, atol=1e-12), (a, b)


def test_hand_worked_origins_yaw_right_moves_the_camera_to_plus_x_pitch_down_moves_it_up():
    r = 2.7
    cases = {  # (yaw, pitch) -> origin, from the formulas above by hand
        (FRONTAL, FRONTAL): (0.0, 0.0, r),
        (FRONTAL + math.pi / 6, FRONTAL): (r / 2, 0.0, r * math.sqrt(3) / 2),
        (FRONTAL - math.pi / 6, FRONTAL): (-r / 2, 0.0, r * math.sqrt(3) / 2),
        (FRONTAL + math.pi / 2, FRONTAL): (r, 0.0, 0.0),
        (math.pi, FRONTAL): (r, 0.0, 0.0),
        (0.0, FRONTAL): (-r, 0.0, 0.0),
        # pitch pi/3: cos(phi) = 1 - 2/3 = 1/3, sin(phi) = sqrt(8)/3: above the head
        (FRONTAL, math.pi / 3): (0.0, r / 3, r * math.sqrt(8) / 3),
        # pitch 2pi/3: cos(phi) = -1/3: below
        (FRONTAL + math.pi / 6, 2 * math.pi / 3): (r * math.sqrt(8) / 6, -r / 3,
                                                   r * math.sqrt(8) / 3 * math.sqrt(3) / 2),
    }
    yaw = torch.tensor([k[0] for k in cases], dtype=torch.float64)
    pitch = torch.tensor([k[1] for k in cases], dtype=torch.float64)
    origins = orbit_poses(yaw, pitch, radius=r, pivot=(0, 0, 0))[:, :3, 3]
    assert torch.allclose(origins, torch.tensor(list(cases.values()), dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("yaw", YAWS)
@pytest.mark.parametrize("pitch", PITCHES)
def test_every_camera_looks_at_the_pivot_without_roll_in_opencv_axes(yaw, pitch):
    pose = orbit_poses(torch.tensor([yaw], dtype=torch.float64), torch.tensor([pitch], dtype=torch.float64),
                       2.7, tuple(PIVOT))[0].numpy()
    rotation, origin = pose[:3, :3], pose[:3, 3]
    assert np.allclose(rotation.T @ rotation, np.eye(3), rtol=0, atol=1e-12) and np.isclose(np.linalg.det(rotation), 1)
    assert np.allclose(pose[3], [0, 0, 0, 1])
    assert np.isclose(np.linalg.norm(origin), 2.7)
    forward = rotation[:, 2]
    towards_pivot = (PIVOT - origin) / np.linalg.norm(PIVOT - origin)
    assert np.allclose(forward, towards_pivot, rtol=0, atol=1e-12)  # z looks at the pivot
    assert abs(rotation[1, 0]) < 1e-12  # x (right) is horizontal: no roll
    assert rotation[1, 1] < 0  # y points down the world's +y (OpenCV)
    K = fov_to_intrinsics(18.837).double().numpy()
    assert np.allclose(project(pose, K, PIVOT), [0.5, 0.5], rtol=0, atol=1e-12)  # the pivot is the image centre
    # The world's up shows at the top of the image, and the camera's right (to +x from the front) on the right.
    assert project(pose, K, PIVOT + [0, 0.1, 0])[1] < 0.5
    assert project(pose, K, PIVOT + rotation[:, 0] * 0.1)[0] > 0.5


def test_the_frontal_camera_sees_world_plus_x_on_the_right_and_a_yawed_camera_sees_the_heads_side():
    K = fov_to_intrinsics(18.837).double().numpy()
    frontal, right, left = orbit_poses(torch.tensor([FRONTAL, FRONTAL + 0.5, FRONTAL - 0.5], dtype=torch.float64),
                                       torch.full((3,), FRONTAL, dtype=torch.float64), 2.7, tuple(PIVOT)).numpy()
    assert project(frontal, K, PIVOT + [0.1, 0, 0])[0] > 0.5
    # The cameras yawed to +x / -x are at +x / -x and see a point on the head's +x side nearer to / farther from them.
    assert right[0, 3] > 0 > left[0, 3]
    point = PIVOT + [0.3, 0, 0]
    assert np.linalg.norm(point - right[:3, 3]) < np.linalg.norm(point - left[:3, 3])


def test_look_at_builds_the_eg3d_matrix_for_arbitrary_origins_and_targets():
    origins = torch.randn(5, 3, dtype=torch.float64) * 3
    origins[:, 2] += 0.5  # keep away from the vertical, where "no roll" is undefined
    targets = torch.randn(5, 3, dtype=torch.float64) * 0.1
    for pose, origin, target in zip(look_at(origins, targets).numpy(), origins.numpy(), targets.numpy()):
        assert np.allclose(pose, eg3d_cam2world(origin, target), rtol=0, atol=1e-12)


def test_intrinsics_use_eg3ds_rounded_formula():
    # f = 1 / (tan(fov / 2) * 1.414) with pi as 3.14159: FFHQ's 18.837 degrees gives 4.2634.
    K = fov_to_intrinsics(18.837).double().numpy()
    assert K[0, 0] == pytest.approx(4.2634, abs=5e-5) and K[1, 1] == K[0, 0]
    assert np.allclose(K, [[K[0, 0], 0, 0.5], [0, K[0, 0], 0.5], [0, 0, 1]])
    for fov in (10.0, 30.0, 60.0, 120.0):
        expected = 1 / (math.tan(fov / 2 * 3.14159 / 180) * 1.414)
        assert fov_to_intrinsics(fov)[0, 0].item() == pytest.approx(expected, rel=1e-6)
    for fov in (0.0, 180.0, -5.0):
        with pytest.raises(ValueError, match="fov_degrees"):
            fov_to_intrinsics(fov)


@pytest.mark.parametrize("skew", [0.0, 0.07])
def test_each_ray_projects_back_to_its_pixel_centre(skew):
    resolution = 5
    yaw = torch.tensor([FRONTAL + 0.4, FRONTAL - 0.8], dtype=torch.float64)
    pitch = torch.tensor([FRONTAL - 0.2, FRONTAL + 0.1], dtype=torch.float64)
    poses = orbit_poses(yaw, pitch, 2.7, tuple(PIVOT))
    K = torch.tensor([[4.0, skew, 0.45], [0, 3.5, 0.55], [0, 0, 1]], dtype=torch.float64)
    origins, directions = camera_rays(poses, K.expand(2, 3, 3), resolution)
    assert origins.shape == directions.shape == (2, resolution * resolution, 3)
    for pose, ray_origins, ray_directions in zip(poses.numpy(), origins.numpy(), directions.numpy()):
        assert np.allclose(ray_origins, pose[:3, 3])
        assert np.allclose(np.linalg.norm(ray_directions, axis=1), 1)
        for index, direction in enumerate(ray_directions):
            row, column = divmod(index, resolution)  # row-major pixels
            u, v = project(pose, K.numpy(), pose[:3, 3] + direction)
            assert np.allclose([u, v], [(column + 0.5) / resolution, (row + 0.5) / resolution], rtol=0, atol=1e-12)


def test_view_cameras_sweep_yaw_from_minus_x_to_plus_x_at_the_given_pitch():
    labels = view_cameras(5, 0.4, radius=2.0, pivot=(0, 0, 0.2), fov_degrees=30.0, pitch=0.1).double()
    pose, K = split_camera_labels(labels)
    assert torch.allclose(K, fov_to_intrinsics(30.0).double().expand(5, 3, 3))
    yaws = FRONTAL + np.linspace(-0.4, 0.4, 5)
    for matrix, yaw in zip(pose.numpy(), yaws):
        assert np.allclose(matrix, eg3d_cam2world(eg3d_origin(yaw, FRONTAL + 0.1, 2.0), PIVOT), rtol=0, atol=1e-6)
    assert pose[0, 0, 3] < 0 < pose[-1, 0, 3]  # the first view from -x, the last from +x
    assert (pose[:, 1, 3] < 0).all()  # pitch above frontal puts the camera below the pivot
    one = split_camera_labels(view_cameras(1, 0.4))[0][0].double().numpy()
    assert np.allclose(one, eg3d_cam2world(eg3d_origin(FRONTAL, FRONTAL, 2.7), PIVOT), rtol=0, atol=1e-6)


def test_camera_labels_are_the_row_major_matrix_then_the_intrinsics():
    pose = torch.randn(3, 4, 4)
    K = torch.randn(3, 3, 3)
    labels = camera_labels(pose, K)
    assert labels.shape == (3, cameras.CAMERA_LABEL_SIZE) == (3, 25)
    for label, matrix, intrinsics in zip(labels.numpy(), pose.numpy(), K.numpy()):
        assert np.array_equal(label[:16], matrix.ravel()) and np.array_equal(label[16:], intrinsics.ravel())
    back_pose, back_K = split_camera_labels(labels)
    assert torch.equal(back_pose, pose) and torch.equal(back_K, K)
    shared = camera_labels(pose, K[0])  # one (3, 3) for all
    assert torch.equal(shared[:, 16:], K[0].reshape(1, 9).expand(3, 9))
    with pytest.raises(ValueError, match=r"\(N, 4, 4\)"):
        camera_labels(pose[:, :3], K)
    for bad in (torch.zeros(2, 24), torch.zeros(2, 25, dtype=torch.long), torch.zeros(25)):
        with pytest.raises(ValueError, match="camera labels"):
            split_camera_labels(bad)
    with pytest.raises(ValueError, match="3 camera labels but the batch has 2"):
        cameras.check_camera_labels("c", labels, batch_size=2)


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_sampled_angles_centre_on_the_frontal_view_with_the_given_spread(distribution):
    yaw_range, pitch_range = 0.5, 0.2
    generator = torch.Generator().manual_seed(3)
    yaw, pitch = sample_orbit_angles(20000, yaw_range, pitch_range, distribution, generator)
    offsets = torch.stack([(yaw - FRONTAL) / yaw_range, (pitch - FRONTAL) / pitch_range])
    # uniform on [-1, 1]: mean 0, variance 1/3; normal: mean 0, variance 1
    variance = 1 / 3 if distribution == "uniform" else 1.0
    assert offsets.mean(1).abs().max() < 0.03
    assert torch.allclose(offsets.var(1), torch.tensor(variance), rtol=0.05)
    if distribution == "uniform":
        assert offsets.abs().max() <= 1 and offsets.abs().max() > 0.99
    with pytest.raises(ValueError, match="distribution"):
        sample_orbit_angles(2, distribution="normal")


def test_sampled_camera_labels_carry_their_yaws():
    generator = torch.Generator().manual_seed(5)
    labels, yaws = sample_camera_labels(6, 0.6, 0.1, radius=2.2, pivot=(0, 0, 0.1), fov_degrees=20.0,
                                        generator=generator)
    pose, K = split_camera_labels(labels)
    origins = pose[:, :3, 3].double().numpy() - [0, 0, 0]
    azimuth = np.pi - np.arctan2(origins[:, 2], origins[:, 0])  # invert x = s cos(pi - yaw), z = s sin(pi - yaw)
    assert np.allclose(azimuth, yaws.double().numpy(), atol=1e-5)
    assert np.allclose(np.linalg.norm(origins, axis=1), 2.2, atol=1e-5)
    assert torch.allclose(K, fov_to_intrinsics(20.0).expand(6, 3, 3))


# --- devices, dtypes, defaults, poles and the random streams -----------------------------------------------


def test_cameras_stay_on_their_inputs_device_and_dtype():
    meta = torch.full((3,), 1.4, device="meta")
    poses = orbit_poses(meta, meta)
    intrinsics = fov_to_intrinsics(18.837, device="meta")
    assert poses.device.type == intrinsics.device.type == "meta"
    assert look_at(meta.expand(3, 3).clone(), torch.zeros(3, device="meta")).device.type == "meta"
    assert camera_labels(poses, fov_to_intrinsics(18.837)).device.type == "meta"  # CPU intrinsics follow the poses
    origins, directions = camera_rays(poses, intrinsics.expand(3, 3, 3), 4)
    assert origins.device.type == directions.device.type == "meta"
    assert cameras.sample_orbit_poses(2, device="meta").device.type == "meta"
    double = orbit_poses(torch.tensor([1.2], dtype=torch.float64), torch.tensor([1.5], dtype=torch.float64))
    assert double.dtype == torch.float64
    origins, directions = camera_rays(double, fov_to_intrinsics(18.837).double()[None], 3)
    assert directions.dtype == torch.float64


def test_look_at_works_for_a_batch_of_three_cameras():
    # With three cameras every dimension of (3, 3) has size 3: the cross products must name their axis.
    origins = torch.tensor([[0.3, 0.2, 2.0], [-1.0, 0.5, 1.5], [2.0, -0.3, 0.4]], dtype=torch.float64)
    for pose, origin in zip(look_at(origins, torch.zeros(3, dtype=torch.float64)).numpy(), origins.numpy()):
        assert np.allclose(pose, eg3d_cam2world(origin, np.zeros(3)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pitch", [0.0, -0.2, 0.5, math.pi, math.pi + 0.3])
def test_pitches_at_and_beyond_the_poles_are_clamped_as_eg3d_does(pitch):
    yaw = torch.tensor([FRONTAL + 0.3], dtype=torch.float64)
    pose = orbit_poses(yaw, torch.tensor([pitch], dtype=torch.float64), 2.7, tuple(PIVOT))[0].numpy()
    assert np.isfinite(pose).all()
    expected = eg3d_cam2world(eg3d_origin(yaw.item(), pitch, 2.7), PIVOT)  # clips pitch to [1e-5, pi - 1e-5]
    assert np.allclose(pose, expected, rtol=0, atol=1e-9)


def test_small_fields_of_view_are_allowed():
    assert fov_to_intrinsics(0.5)[0, 0].item() == pytest.approx(1 / (math.tan(0.25 * 3.14159 / 180) * 1.414), rel=1e-6)


def test_defaults_are_ffhqs_orbit_and_field_of_view():
    ffhq = fov_to_intrinsics(18.837)
    for labels in (view_cameras(3, 0.3), sample_camera_labels(4, 0.3, 0.1)[0]):
        pose, K = split_camera_labels(labels)
        assert torch.equal(K, ffhq.expand(len(K), 3, 3))
        assert torch.allclose(pose[:, :3, 3].norm(dim=1), torch.tensor(2.7))
        forward = pose[:, :3, 2]
        towards_pivot = torch.nn.functional.normalize(torch.tensor([0, 0, 0.2]) - pose[:, :3, 3], dim=1)
        assert torch.allclose(forward, towards_pivot, atol=1e-6)
    poses = cameras.sample_orbit_poses(4, generator=torch.Generator().manual_seed(2))
    yaw, pitch = sample_orbit_angles(4, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(poses, orbit_poses(yaw, pitch, 2.7, (0.0, 0.0, 0.2)), atol=1e-6)
    assert ((yaw - FRONTAL).abs() <= math.radians(45)).all() and ((pitch - FRONTAL).abs() <= math.radians(20)).all()


def test_view_cameras_of_one_and_two_views_and_a_pivot_of_their_own():
    one = view_cameras(1, 0.5)
    assert one.shape == (1, 25) and abs(one[0, 3].item()) < 1e-6  # frontal: x = 0
    two = split_camera_labels(view_cameras(2, 0.5, radius=2.0, pivot=(0.1, 0.2, 0.3)))[0].double().numpy()
    for pose, yaw in zip(two, (FRONTAL - 0.5, FRONTAL + 0.5)):
        assert np.allclose(pose, eg3d_cam2world(eg3d_origin(yaw, FRONTAL, 2.0), np.array([0.1, 0.2, 0.3])),
                           rtol=0, atol=1e-6)


def test_sampled_angles_and_labels_are_the_generators_uniform_draws():
    """yaw = pi/2 + (2 u0 - 1) yaw_range, pitch = pi/2 + (2 u1 - 1) pitch_range from u = rand(2, N) of the
    given generator (normal draws for "gaussian"), whatever the global random state; nothing more is drawn."""
    n, yaw_range, pitch_range = 5, 0.7, 0.2
    u = torch.rand(2, n, generator=torch.Generator().manual_seed(11))
    z = torch.randn(2, n, generator=torch.Generator().manual_seed(11))
    for distribution, offsets in (("uniform", u * 2 - 1), ("gaussian", z)):
        generator = torch.Generator().manual_seed(11)
        torch.manual_seed(0)
        yaw, pitch = sample_orbit_angles(n, yaw_range, pitch_range, distribution, generator)
        assert torch.allclose(yaw, FRONTAL + offsets[0] * yaw_range)
        assert torch.allclose(pitch, FRONTAL + offsets[1] * pitch_range)
        follow = torch.Generator().manual_seed(11)
        (torch.rand if distribution == "uniform" else torch.randn)(2, n, generator=follow)
        assert torch.equal(generator.get_state(), follow.get_state())
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(1)
    labels, yaws = sample_camera_labels(n, yaw_range, pitch_range, radius=2.0, pivot=(0.1, 0.0, 0.3),
                                        fov_degrees=25.0, generator=generator)
    assert torch.allclose(yaws, FRONTAL + (u[0] * 2 - 1) * yaw_range)
    pitches = FRONTAL + (u[1] * 2 - 1) * pitch_range
    pose = split_camera_labels(labels)[0].double().numpy()
    for matrix, a, b in zip(pose, yaws.double().numpy(), pitches.double().numpy()):
        assert np.allclose(matrix, eg3d_cam2world(eg3d_origin(a, b, 2.0), np.array([0.1, 0.0, 0.3])), rtol=0,
                           atol=1e-6)


def test_camera_label_errors_name_the_argument_and_what_it_got():
    with pytest.raises(ValueError, match=r"^c must be a floating tensor .* got \(2, 24\)$"):
        split_camera_labels(torch.zeros(2, 24))
    with pytest.raises(ValueError, match=r"^cams must be .* got list$"):
        cameras.check_camera_labels("cams", [[0.0] * 25])
    cameras.check_camera_labels("c", torch.zeros(3, 25), batch_size=3)  # the count is the first dimension


def test_orbit_defaults_and_a_pivot_of_their_own_for_sampled_poses():
    pose = orbit_poses(torch.tensor([FRONTAL]), torch.tensor([FRONTAL]))[0]  # FFHQ's orbit: radius 2.7, pivot z 0.2
    assert torch.allclose(pose[:3, 3], torch.tensor([0.0, 0.0, 2.7]), atol=1e-6)
    pivot = (0.1, -0.1, 0.3)
    poses = cameras.sample_orbit_poses(3, radius=1.5, pivot=pivot, generator=torch.Generator().manual_seed(4))
    yaw, pitch = sample_orbit_angles(3, generator=torch.Generator().manual_seed(4))
    for matrix, a, b in zip(poses.double().numpy(), yaw.double().numpy(), pitch.double().numpy()):
        assert np.allclose(matrix, eg3d_cam2world(eg3d_origin(a, b, 1.5), np.array(pivot)), rtol=0, atol=1e-6)
