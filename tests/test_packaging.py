"""An installed copy of the package (not the source tree) carries every file its defaults read."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run from the built copy only: the source tree is not on the path, so a default that points into the
# repository (outside the package) fails here.
CHECK_INSTALLED_DEFAULTS = """
from pathlib import Path
import dreamportrait
from dreamportrait.cli import WORLD_CONFIG
from dreamportrait.training.config import load_config
from dreamportrait.world.assets import NAMES, asset_dir

package = Path(dreamportrait.__file__).resolve().parent
assert package.is_relative_to(Path.cwd()), f"imported {package}, not the built copy"
assert Path(WORLD_CONFIG).is_relative_to(package), WORLD_CONFIG
for name in NAMES:
    assert asset_dir(name).is_relative_to(package), name
assert load_config(WORLD_CONFIG, [f"guidance.source={asset_dir('teacher')}"]).steps > 0
"""


def test_the_built_package_carries_its_configs_and_world_models(tmp_path):
    build = tmp_path / "build"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)],
                   cwd=ROOT, check=True, capture_output=True)
    built = build / "dreamportrait"
    for source_dir in ("configs", "assets/world"):
        expected = sorted(p.relative_to(ROOT / "dreamportrait") for p in (ROOT / "dreamportrait" / source_dir).rglob("*")
                          if p.is_file())
        copied = sorted(p.relative_to(built) for p in (built / source_dir).rglob("*") if p.is_file())
        assert copied == expected and expected, source_dir
    subprocess.run([sys.executable, "-c", CHECK_INSTALLED_DEFAULTS], cwd=build, check=True,
                   env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(build), "HOME": str(tmp_path)})
