"""Shared test set-up.

Random inputs are fresh on every run: each test gets its own seed, printed when it fails; set
DREAMPORTRAIT_TEST_SEED to replay one.
"""

import os
import tempfile

import torch

# Triton kernels run on CPU tensors only through the interpreter, which triton reads at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh inductor cache per run: a cached graph embeds the fake kernels' strides of the build it
# was compiled against, and would hide a change to them.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="dreamportrait-inductor-"))

import random  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_latent_sd(tmp_path_factory):
    """A tiny latent Stable Diffusion directory (unet, vae, scheduler, tokenizer, text encoder)."""
    from tiny_models import write_tiny_stable_diffusion

    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("latent-sd"))


@pytest.fixture(scope="session")
def tiny_pixel_sd(tmp_path_factory):
    """The same without a VAE: a pixel-space diffusion model (no VAE sampling noise)."""
    from tiny_models import write_tiny_stable_diffusion

    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("pixel-sd"), latent=False)


@pytest.fixture(autouse=True)
def seed(request):
    """Seed torch with a fresh random seed per test; replay with DREAMPORTRAIT_TEST_SEED."""
    value = int(os.environ.get("DREAMPORTRAIT_TEST_SEED") or random.SystemRandom().randrange(2**31))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if report.failed and seeds:
        report.sections.append(("seed", f"DREAMPORTRAIT_TEST_SEED={seeds[0]}"))
