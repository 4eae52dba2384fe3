"""Shape extraction through the generator's density."""

import pytest
import torch
import trimesh

from dreamportrait.models import build_generator, density_grid, extract_mesh


def test_sphere_density_gives_a_closed_outward_sphere(monkeypatch):
    generator = build_generator("tiny").eval()
    centre, radius = torch.tensor([0.1, -0.05, 0.05]), 0.3

    def sphere(points, ws, noise_mode="random", planes=None):
        distance = (points - centre).norm(dim=-1, keepdim=True)
        return {"sigma": 50 * (radius - distance) + 10, "rgb": torch.zeros(*points.shape[:2], 32)}

    monkeypatch.setattr(generator, "sample_mixed", sphere)
    ws = generator.mapping(torch.randn(1, generator.z_dim), torch.randn(1, 25))
    mesh = extract_mesh(generator, ws, resolution=48, level=10, progress=False)
    vertices = torch.tensor(mesh.vertices, dtype=torch.float32)
    normals = torch.tensor(mesh.vertex_normals, dtype=torch.float32)
    distances = (vertices - centre).norm(dim=1)
    assert (distances - radius).abs().max() < 1.5 / 48
    assert mesh.is_watertight and mesh.volume == pytest.approx(4 / 3 * torch.pi * radius**3, rel=0.05)
    assert ((normals * (vertices - centre)).sum(1) > 0).float().mean() > 0.99  # normals point outwards


def test_generator_mesh_exports(tmp_path):
    generator = build_generator("tiny").eval()
    ws = generator.mapping(torch.randn(1, generator.z_dim), torch.randn(1, 25))
    sigma = density_grid(generator, ws, resolution=24, chunk=1000, progress=False)
    assert sigma.shape == (24, 24, 24) and torch.isfinite(sigma).all()
    mesh = extract_mesh(generator, ws, resolution=24, level=sigma.median().item(), progress=False)
    assert len(mesh.faces) > 0 and (abs(mesh.vertices) <= 0.5).all()
    for suffix in ("ply", "obj", "glb"):
        path = tmp_path / f"shape.{suffix}"
        mesh.export(path)
        assert len(trimesh.load(path, force="mesh").faces) == len(mesh.faces)
    with pytest.raises(ValueError, match="never crosses level"):
        extract_mesh(generator, ws, resolution=8, level=sigma.max().item() + 100, progress=False)
    with pytest.raises(ValueError, match=r"ws must have shape \(1, num_ws, w_dim\)"):
        extract_mesh(generator, ws.expand(2, -1, -1), resolution=8)
