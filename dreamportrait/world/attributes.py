"""The synthetic portrait world's attributes, their captions, and the held-out combinations.

Every head has six attributes chosen to be visible at 32² (:data:`ATTRIBUTES`). Captions are
written from attributes in several phrasings and parse back to them exactly
(:func:`caption`, :func:`parse_caption`). When a head is bald and beardless its hair colour is
invisible: such heads carry ``hair_color = "none"``.

Held out from every training stage (teacher, judge, generator) and used for evaluation only:
the combinations matched by :data:`HELD_OUT_RULES` — each pairs attributes that are seen in
training, never together:

1. red hair under a blue hat;
2. blond hair on dark skin, with glasses;
3. long hair with a beard and a red hat.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import asdict, dataclass, fields

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hair_color": ("black", "brown", "blond", "red", "white"),
    "skin_tone": ("light", "medium", "dark"),
    "hair_style": ("bald", "short", "long"),
    "beard": ("no", "yes"),
    "glasses": ("no", "yes"),
    "hat": ("none", "red", "blue"),
}
"""Each attribute's values (a bald, beardless head's hair colour is ``"none"``)."""


@dataclass(frozen=True)
class HeadAttributes:
    hair_color: str
    skin_tone: str
    hair_style: str
    beard: str
    glasses: str
    hat: str

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            allowed = ATTRIBUTES[field.name] + (("none",) if field.name == "hair_color" else ())
            if value not in allowed:
                raise ValueError(f"{field.name} must be one of {allowed}, got {value!r}")
        if (self.hair_color == "none") != self.hair_invisible:
            raise ValueError("hair_color is 'none' exactly when the head is bald and beardless, got "
                             f"{self.hair_color!r} for hair_style={self.hair_style!r}, beard={self.beard!r}")

    @property
    def hair_invisible(self) -> bool:
        return self.hair_style == "bald" and self.beard == "no"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def all_combinations() -> list[HeadAttributes]:
    """Every distinct head (hair colour collapsed to "none" where it cannot be seen)."""
    heads = set()
    for values in itertools.product(*ATTRIBUTES.values()):
        kwargs = dict(zip(ATTRIBUTES, values))
        if kwargs["hair_style"] == "bald" and kwargs["beard"] == "no":
            kwargs["hair_color"] = "none"
        heads.add(HeadAttributes(**kwargs))
    return sorted(heads, key=lambda h: tuple(h.as_dict().values()))


HELD_OUT_RULES = (
    {"hair_color": "red", "hat": "blue"},
    {"hair_color": "blond", "skin_tone": "dark", "glasses": "yes"},
    {"hair_style": "long", "beard": "yes", "hat": "red"},
)


def is_held_out(head: HeadAttributes) -> bool:
    return any(all(getattr(head, key) == value for key, value in rule.items()) for rule in HELD_OUT_RULES)


def training_combinations() -> list[HeadAttributes]:
    return [head for head in all_combinations() if not is_held_out(head)]


def held_out_combinations() -> list[HeadAttributes]:
    return [head for head in all_combinations() if is_held_out(head)]


# --- captions ---------------------------------------------------------------------------------

PHRASINGS = (
    "a portrait of a {skin}-skinned person {with_all}",
    "a photo of a person {with_all}, {skin} skin",
    "a {skin}-skinned person {with_all}, portrait",
)
"""Caption templates; ``{with_all}`` lists the head's features ("with short red hair and glasses")."""


def _features(head: HeadAttributes) -> list[str]:
    parts = []
    if head.hair_style == "bald":
        parts.append("a bald head")
    else:
        parts.append(f"{head.hair_style} {head.hair_color} hair")
    if head.beard == "yes":
        parts.append(f"a {head.hair_color} beard" if head.hair_style == "bald" else "a beard")
    if head.glasses == "yes":
        parts.append("glasses")
    if head.hat != "none":
        parts.append(f"a {head.hat} hat")
    return parts


def caption(head: HeadAttributes, phrasing: int | None = None, rng: random.Random | None = None) -> str:
    """A caption of ``head`` in phrasing ``phrasing`` (default: drawn with ``rng``)."""
    if phrasing is None:
        phrasing = (rng or random).randrange(len(PHRASINGS))
    features = _features(head)
    with_all = "with " + (features[0] if len(features) == 1 else ", ".join(features[:-1]) + " and " + features[-1])
    return PHRASINGS[phrasing].format(skin=head.skin_tone, with_all=with_all)


_HAIR = re.compile(r"\b(short|long) (black|brown|blond|red|white) hair\b")
_BALD_BEARD = re.compile(r"\ba (black|brown|blond|red|white) beard\b")
_SKIN = re.compile(r"\b(light|medium|dark)(?:-skinned| skin)\b")
_HAT = re.compile(r"\ba (red|blue) hat\b")


def parse_caption(text: str) -> HeadAttributes:
    """The attributes a caption written by :func:`caption` describes."""
    skin = _SKIN.search(text)
    if skin is None:
        raise ValueError(f"caption names no skin tone: {text!r}")
    hair = _HAIR.search(text)
    bald_beard = _BALD_BEARD.search(text)
    beard = "yes" if re.search(r"\bbeard\b", text) else "no"
    if hair:
        style, color = hair.group(1), hair.group(2)
    elif "a bald head" in text:
        style, color = "bald", bald_beard.group(1) if bald_beard else "none"
    else:
        raise ValueError(f"caption names no hair: {text!r}")
    hat = _HAT.search(text)
    return HeadAttributes(hair_color=color, skin_tone=skin.group(1), hair_style=style, beard=beard,
                          glasses="yes" if re.search(r"\bglasses\b", text) else "no",
                          hat=hat.group(1) if hat else "none")
