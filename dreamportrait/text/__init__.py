"""Text for the generator: prompts -> CLIP text features (:mod:`.encoder`), and the text paths
that condition a tri-plane generator on them (:mod:`.conditioning`)."""

from .conditioning import ConditionAdapters, TextConditionedGenerator, TriplaneCrossAttention
from .encoder import TextEncoder, TextFeatures

__all__ = ["ConditionAdapters", "TextConditionedGenerator", "TextEncoder", "TextFeatures", "TriplaneCrossAttention"]
