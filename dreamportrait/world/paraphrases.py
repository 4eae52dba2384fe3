"""The held-out paraphrase test set: the held-out combinations described in words no training
caption uses.

Written apart from the training captions (:mod:`~dreamportrait.world.captions`) and read by
evaluation only. Its :data:`TEMPLATES` are not training templates, and part of its
:data:`SYNONYMS` are not training synonyms (the test suite computes both from the two modules).
Each held-out synonym still shares a word with a training synonym of the same value ("bright
red", "a full beard", "reading glasses"): a text encoder trained from scratch on a closed
vocabulary cannot know what a word it never saw means, so a synonym built of unseen words only
would measure nothing but that. Words that carry no attribute (person words, "headshot",
"sporting") may be unseen: they must not break the rest.

:func:`paraphrase_test_set` is fixed: one prompt per held-out combination, in
:func:`~dreamportrait.world.attributes.held_out_combinations` order, each with its attributes.
"""

from __future__ import annotations

import random

from .attributes import HeadAttributes, held_out_combinations
from .captions import Caption

SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "hair_color": {"black": ("black", "raven black"), "brown": ("brunette", "chestnut brown"),
                   "blond": ("blonde", "golden blond", "platinum blond"),
                   "red": ("ginger", "bright red", "coppery red"), "white": ("gray", "silver-grey", "snow white")},
    "skin_tone": {"light": ("fair", "very pale"), "medium": ("olive", "warm olive"), "dark": ("dark", "very dark")},
    "hair_style": {"short": ("short", "very short"), "long": ("long", "very long")},
    "hat": {"red": ("scarlet", "bright red"), "blue": ("navy", "royal blue")},
}
"""The words for each attribute value in the test set."""

GLASSES_WORDS = ("spectacles", "reading glasses", "round glasses")
HAT_NOUNS = ("cap", "baseball hat", "peaked cap")
BEARD_PHRASES = ("a beard", "a full beard")
BALD_PHRASES = ("a bald head", "a shaved bald head")
PERSON_WORDS = ("gentleman", "fellow", "teenager", "woman", "man", "senior")

TEMPLATES = (
    "headshot of a {person} who has {features}",
    "close-up: {person} sporting {features}",
    "{features} ({person})",
    "picture showing a {person} having {features}",
    "{person} -- {features}",
)
"""Test-set skeletons: ``{features}`` lists every attribute's noun phrase."""

SEED = 20_251_207
"""The test set's fixed draw."""


def _pick(rng: random.Random, options):
    return options[rng.randrange(len(options))]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def describe(head: HeadAttributes, rng: random.Random) -> Caption:
    """A test-set prompt of ``head`` drawn with ``rng``."""
    features = []
    if head.hair_style == "bald":
        features.append(_pick(rng, BALD_PHRASES))
        if head.beard == "yes":
            color = _pick(rng, SYNONYMS["hair_color"][head.hair_color])
            features.append(f"{_article(color)} {color} beard")
    else:
        style = _pick(rng, SYNONYMS["hair_style"][head.hair_style])
        # "long, black hair" (a comma no training caption puts there) or "long black hair"
        comma = _pick(rng, (",", ""))
        features.append(f"{style}{comma} {_pick(rng, SYNONYMS['hair_color'][head.hair_color])} hair")
        if head.beard == "yes":
            features.append(_pick(rng, BEARD_PHRASES))
    skin = _pick(rng, SYNONYMS["skin_tone"][head.skin_tone])
    features.append(f"{skin} skin")
    if head.glasses == "yes":
        features.append(_pick(rng, GLASSES_WORDS))
    if head.hat != "none":
        features.append(f"a {_pick(rng, SYNONYMS['hat'][head.hat])} {_pick(rng, HAT_NOUNS)}")
    rng.shuffle(features)
    listed = ", ".join(features[:-1]) + " and " + features[-1] if len(features) > 1 else features[0]
    text = _pick(rng, TEMPLATES).format(person=_pick(rng, PERSON_WORDS), features=listed)
    return Caption(text, head)


def paraphrase_test_set() -> list[Caption]:
    """One prompt per held-out combination (:func:`describe`, drawn from :data:`SEED`)."""
    rng = random.Random(SEED)
    return [describe(head, rng) for head in held_out_combinations()]
