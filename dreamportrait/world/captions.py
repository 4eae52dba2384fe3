"""Captions as people write them: many surface forms of one head's attributes, for training.

:func:`~dreamportrait.world.attributes.caption` writes the world's canonical phrasings (what the
evaluation prompts and the packaged models were trained on). :func:`paraphrase` writes the same
attributes the way people type prompts: several templates and word orders ("a photo of a
red-haired woman with long hair, wearing glasses", "man, short ginger hair, spectacles, fair
skin"), synonyms for each value (:data:`SYNONYMS`), adjective forms ("bearded", "dark-skinned",
"long-haired"), "wearing"/"in" clauses, lists with and without "and", casing and punctuation
variety, and person words (:data:`PERSON_WORDS`) that the world does not render. Every caption is
returned with the attributes it describes (:class:`Caption`), so nothing has to parse it back.

Choices the module makes, and why:

- Person words are drawn independently of the attributes ("a lady with a beard" happens): the
  world renders no sex or age, so a model must learn to ignore them, not to read "woman" as "no
  beard".
- The world's hat is a cap with a brim, so "hat", "cap" and "baseball cap" name it; "beanie" (no
  brim) does not fit and is not used.
- The teacher's attention supervision (:func:`~dreamportrait.world.teacher.phrase_region`) ties
  each phrase between commas, "with" and "and" to the region it names. Most templates keep one
  region per phrase; the "wearing" forms ("a red-haired woman wearing glasses") put two in one
  phrase, as people write them, and such a phrase is left unsupervised.

The held-out paraphrase test set (:mod:`~dreamportrait.world.paraphrases`) is written separately,
with its own templates and partly its own synonyms.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .attributes import HeadAttributes

CAPTION_SETS = ("canonical", "paraphrase")
"""Which captions a training stage reads: the canonical phrasings only, or :func:`training_text`'s mix."""

CANONICAL_SHARE = 0.25
"""The share of canonical captions among ``"paraphrase"`` training captions: the evaluation's
canonical prompts stay in the training distribution."""


@dataclass(frozen=True)
class Caption:
    """A caption and the attributes it describes."""

    text: str
    attributes: HeadAttributes


SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "hair_color": {"black": ("black", "jet-black"), "brown": ("brown", "brunette", "chestnut"),
                   "blond": ("blond", "blonde", "golden"), "red": ("red", "ginger", "auburn"),
                   "white": ("white", "grey", "gray", "silver")},
    "skin_tone": {"light": ("light", "fair", "pale"), "medium": ("medium", "olive", "tan"), "dark": ("dark",)},
    "hair_style": {"short": ("short", "cropped"), "long": ("long", "flowing")},
    "hat": {"red": ("red", "scarlet"), "blue": ("blue", "navy")},
}
"""The words for each attribute value (hair style "bald", the beard, the glasses and the hat's
noun have their own word lists below)."""

GLASSES_WORDS = ("glasses", "spectacles", "eyeglasses")
BEARD_WORDS = ("a beard", "bearded")
HAT_NOUNS = ("hat", "cap", "baseball cap")
BALD_PHRASES = ("a bald head", "a shaved head")
PERSON_WORDS = ("person", "man", "woman", "guy", "lady", "child", "boy", "girl", "kid", "adult", "individual")

PREFIXES = ("a portrait of", "portrait of", "a photo of", "photo of", "a picture of", "an image of", "")
"""What comes before the subject; "" starts with the subject itself."""

TEMPLATES = (
    "{prefix} {subject} with {features}",
    "{prefix} {subject} with {features}, {wearing}",
    "{prefix} {subject} {wearing} with {features}",
    "{prefix} {subject}, {features}",
    "{features}, {subject}",
)
"""Caption skeletons: ``{subject}`` is an article, adjectives and a person word ("a bearded,
dark-skinned man"); ``{features}`` the noun phrases of the attributes not said as adjectives or
worn (a list joined with commas, with or without a final "and"); ``{wearing}`` the worn things
("wearing glasses and a blue cap"). A template with ``{wearing}`` is used only when something is
worn. Any attribute not said otherwise goes into ``{features}``, so no template drops one."""


def _pick(rng: random.Random, options):
    return options[rng.randrange(len(options))]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join(items: list[str], rng: random.Random) -> str:
    """A list as people write it: "a, b and c", "a, b, c" or "a and b and c"."""
    if len(items) == 1:
        return items[0]
    style = rng.randrange(3)
    if style == 0:
        return ", ".join(items[:-1]) + " and " + items[-1]
    if style == 1:
        return ", ".join(items)
    return " and ".join(items)


def _surface(text: str, rng: random.Random) -> str:
    """Casing and punctuation variety; whitespace is normalised."""
    text = re.sub(r"\s+", " ", text).strip()
    casing = rng.random()
    if casing < 0.15:
        text = text[:1].upper() + text[1:]
    elif casing < 0.22:
        text = text.title()
    elif casing < 0.25:
        text = text.upper()
    return text + _pick(rng, ("", "", ".", "!"))


def paraphrase(head: HeadAttributes, rng: random.Random) -> Caption:
    """A caption of ``head`` in a surface form drawn with ``rng`` (module docstring)."""
    adjectives: list[str] = []  # said before the person word
    features: list[str] = []    # noun phrases after "with" (or in a comma list)
    worn: list[str] = []        # glasses and the hat, when the template says "wearing"
    color = _pick(rng, SYNONYMS["hair_color"][head.hair_color]) if head.hair_color != "none" else ""
    skin = _pick(rng, SYNONYMS["skin_tone"][head.skin_tone])

    if head.hair_style == "bald":
        if rng.random() < 0.5:
            adjectives.append("bald")
        else:
            features.append(_pick(rng, BALD_PHRASES))
        if head.beard == "yes":  # the beard is the only place the hair colour shows
            if rng.random() < 0.4:
                adjectives.append(f"{color}-bearded")
            else:
                features.append(f"{_article(color)} {color} beard")
    else:
        style = _pick(rng, SYNONYMS["hair_style"][head.hair_style])
        form = rng.randrange(3)
        if form == 0:
            features.append(f"{style} {color} hair")
        elif form == 1:  # "a red-haired woman with long hair"
            adjectives.append(f"{color}-haired")
            features.append(f"{style} hair")
        else:            # "a long-haired woman with red hair"
            adjectives.append(f"{head.hair_style}-haired")
            features.append(f"{color} hair")
        if head.beard == "yes":
            word = _pick(rng, BEARD_WORDS)
            (adjectives if word == "bearded" else features).append(word)

    if rng.random() < 0.5:
        adjectives.append(f"{skin}-skinned")
    else:
        features.append(_pick(rng, (f"{skin} skin", f"{_article(skin)} {skin} complexion")))

    template = _pick(rng, TEMPLATES)
    says_wearing = "{wearing}" in template
    things = []
    if head.glasses == "yes":
        things.append(_pick(rng, GLASSES_WORDS))
    if head.hat != "none":
        things.append(f"a {_pick(rng, SYNONYMS['hat'][head.hat])} {_pick(rng, HAT_NOUNS)}")
    if says_wearing and not things:
        template = _pick(rng, [t for t in TEMPLATES if "{wearing}" not in t])
        says_wearing = False
    (worn if says_wearing else features).extend(things)

    if not features:  # only a bald head can say every attribute as an adjective or worn thing
        adjectives.remove("bald")
        features.append("a bald head")
    rng.shuffle(adjectives)
    rng.shuffle(features)
    person = _pick(rng, PERSON_WORDS)
    words = (", " if len(adjectives) > 1 and rng.random() < 0.5 else " ").join(adjectives)
    subject_words = f"{words} {person}".strip()
    subject = f"{_article(subject_words)} {subject_words}"
    wearing = f"{_pick(rng, ('wearing', 'in'))} {_join(worn, rng)}" if worn else ""
    text = template.format(prefix=_pick(rng, PREFIXES), subject=subject, features=_join(features, rng),
                           wearing=wearing)
    return Caption(_surface(text, rng), head)


def training_text(canonical: str, head: HeadAttributes, rng: random.Random) -> str:
    """A ``"paraphrase"`` training caption of ``head``, whose canonical caption is ``canonical``:
    that one with probability :data:`CANONICAL_SHARE`, else a :func:`paraphrase` drawn with ``rng``."""
    return canonical if rng.random() < CANONICAL_SHARE else paraphrase(head, rng).text


def check_captions(captions: str) -> str:
    """``captions`` if it names a caption set (:data:`CAPTION_SETS`), else ValueError naming it."""
    if captions not in CAPTION_SETS:
        raise ValueError(f"captions must be one of {CAPTION_SETS}, got {captions!r}")
    return captions


def words_of(text: str) -> list[str]:
    """The words of ``text`` as the tokenizer's vocabulary holds them: lower case, letters only
    (hyphens and punctuation are tokens of their own)."""
    return re.findall(r"[a-z]+", text.lower())


def paraphrase_vocabulary() -> set[str]:
    """Every word :func:`paraphrase` can write."""
    pieces = [*PREFIXES, *TEMPLATES, *GLASSES_WORDS, *BEARD_WORDS, *HAT_NOUNS, *BALD_PHRASES, *PERSON_WORDS,
              "an a with and wearing in bald bearded haired skinned skin complexion hair beard"]
    pieces += [word for table in SYNONYMS.values() for values in table.values() for word in values]
    return {word for piece in pieces for word in words_of(re.sub(r"\{[a-z_]+\}", " ", piece))}
