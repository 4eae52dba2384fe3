"""Defaults that the library and the command line share, in a module that imports neither torch nor
anything else heavy, so that ``dreamportrait --help`` stays fast and each value is written once."""

from pathlib import Path

TRUNCATION_PSI = 0.7
"""EG3D's generation scripts' truncation: what ``generate`` and the evaluation harness sample at."""

BASELINE_STEPS = 10_000
"""The per-prompt SDS baseline's steps: threestudio's DreamFusion default (the paper optimises 15,000)."""

WORLD_CONFIG = str(Path(__file__).resolve().parent / "configs" / "world.yaml")
"""The synthetic world's DreamPortrait config, shipped inside the package (``configs/`` at the
repository root links there), so an installed copy finds it too."""

LEARN_WORDS_CANONICAL_WEIGHT = 3.0
"""``world learn-words``: weight of the term keeping canonical captions' token states and pooled
embeddings where the source text encoder put them (:mod:`dreamportrait.world.new_words`)."""
