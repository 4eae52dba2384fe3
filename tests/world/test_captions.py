"""Training paraphrases (dreamportrait.world.captions) and the held-out paraphrase test set
(dreamportrait.world.paraphrases): every caption says exactly its attributes, the tokenizer holds
every training word, the teacher's phrase regions stay meaningful, and the test set's templates
and a third of its synonyms are unseen in training."""

import random
import re

import pytest

from dreamportrait.text.encoder import split_phrases
from dreamportrait.world import all_combinations, caption, held_out_combinations, training_combinations
from dreamportrait.world import captions as train_captions
from dreamportrait.world import paraphrases as test_set
from dreamportrait.world.assets import asset_dir
from dreamportrait.world.attributes import PHRASINGS, HeadAttributes
from dreamportrait.world.captions import (CANONICAL_SHARE, Caption, check_captions, paraphrase, training_text,
                                          words_of)
from dreamportrait.world.heads import MASK_PARTS
from dreamportrait.world.teacher import caption_words, check_vocabulary, missing_words, phrase_region
from dreamportrait.world.tokenizer import bpe, write_clip_tokenizer
from dreamportrait.world.train import PARAPHRASES_PER_COMBINATION, training_prompts


def contains(text_words: list[str], phrase: str) -> bool:
    """Whether ``phrase``'s words occur in ``text_words`` as a contiguous run."""
    wanted = words_of(phrase)
    return any(text_words[i:i + len(wanted)] == wanted for i in range(len(text_words) - len(wanted) + 1))


def said_values(text: str, module) -> dict[str, set[str]]:
    """Read a caption with ``module``'s word tables, independently of how it was written: for each
    attribute, the values whose words occur. A hat is a colour word right before a hat noun; its
    words are then taken out, so that the rest is read for the hair (a bald head says "bald" or
    "shaved")."""
    words = words_of(text)
    tables = module.SYNONYMS
    said = {"hat": set()}
    for value, colours in tables["hat"].items():
        for phrase in (f"{colour} {noun}" for colour in colours for noun in module.HAT_NOUNS):
            wanted = words_of(phrase)
            for i in range(len(words) - len(wanted) + 1):
                if words[i:i + len(wanted)] == wanted:
                    said["hat"].add(value)
                    words[i:i + len(wanted)] = ["_"] * len(wanted)
    said["hat"] = said["hat"] or {"none"}
    for name in ("hair_color", "skin_tone", "hair_style"):
        said[name] = {value for value, phrases in tables[name].items() if any(contains(words, p) for p in phrases)}
    if "bald" in words or "shaved" in words:
        said["hair_style"].add("bald")
    said["glasses"] = {"yes" if any(contains(words, p) for p in module.GLASSES_WORDS) else "no"}
    said["beard"] = {"yes" if {"beard", "bearded"} & set(words) else "no"}
    if any(contains(words, noun) for noun in module.HAT_NOUNS) or "hat" in words or "cap" in words:
        said["hat"].add("a hat noun without its colour")
    return said


def expected_values(head: HeadAttributes) -> dict[str, set[str]]:
    return {"hair_color": set() if head.hair_color == "none" else {head.hair_color}, "skin_tone": {head.skin_tone},
            "hair_style": {head.hair_style}, "glasses": {head.glasses}, "beard": {head.beard}, "hat": {head.hat}}


def test_every_paraphrase_says_exactly_its_attributes_on_every_combination(seed):
    for index, head in enumerate(all_combinations()):
        rng = random.Random(seed * 1000 + index)
        for _ in range(12):
            result = paraphrase(head, rng)
            assert isinstance(result, Caption) and result.attributes == head
            assert said_values(result.text, train_captions) == expected_values(head), result.text


def articles_agree(text: str) -> bool:
    """Every "a"/"an" in ``text`` is the one its next word's first letter asks for (no word in the
    captions starts with a silent consonant or a consonant-sounding vowel)."""
    return all((article.lower() == "an") == (letter.lower() in "aeiou")
               for article, letter in re.findall(r"\b(an|a)\s+([A-Za-z])", text, flags=re.IGNORECASE))


def test_articles_agree_with_the_next_word_in_both_caption_sets(seed):
    assert not articles_agree("a auburn-haired man") and not articles_agree("An red hat")
    rng = random.Random(seed)
    texts = [paraphrase(head, rng).text for head in all_combinations() for _ in range(12)]
    texts += [prompt.text for prompt in test_set.paraphrase_test_set()]
    vowel_led = [t for t in texts if re.search(r"\ban\s", t, flags=re.IGNORECASE)]
    assert vowel_led, "no caption used 'an': the check would not see a wrong article"
    for text in texts:
        assert articles_agree(text), text


def test_every_held_out_prompt_says_exactly_its_attributes(seed):
    prompts = test_set.paraphrase_test_set()
    assert [p.attributes for p in prompts] == held_out_combinations()
    assert prompts == test_set.paraphrase_test_set()  # a fixed set
    assert len({p.text for p in prompts}) == len(prompts)
    for p in prompts:
        assert said_values(p.text, test_set) == expected_values(p.attributes), p.text
        # Each names a person with one of the set's own person words (which the world does not render).
        assert sum(contains(words_of(p.text), word) for word in test_set.PERSON_WORDS) >= 1, p.text
    rng = random.Random(seed)  # and for any draw, on any combination
    for head in all_combinations():
        described = test_set.describe(head, rng)
        assert said_values(described.text, test_set) == expected_values(head), described.text


def test_paraphrases_vary_in_every_way_the_module_promises(seed):
    rng = random.Random(seed)
    heads = all_combinations()
    texts = [paraphrase(rng.choice(heads), rng).text for _ in range(4000)]
    lowered = [t.lower() for t in texts]
    words = {w for t in lowered for w in words_of(t)}
    for table in train_captions.SYNONYMS.values():
        for phrases in table.values():
            assert all(set(words_of(p)) <= words for p in phrases), phrases
    assert set(train_captions.PERSON_WORDS) <= words
    assert {"wearing", "in", "with", "and", "bearded", "haired", "skinned", "complexion"} <= words
    for prefix in train_captions.PREFIXES[:-1]:
        assert any(t.startswith(prefix) for t in lowered), prefix
    assert any(t == t.upper() for t in texts) and any(t[0].isupper() and t != t.upper() for t in texts)
    assert any(t.endswith(".") for t in texts) and any(t[-1].isalpha() for t in texts)
    assert any(", " in t and " and " not in t for t in lowered) and any(" and " in t for t in lowered)
    assert len(set(texts)) > 0.9 * len(texts)
    head = rng.choice(heads)
    assert paraphrase(head, random.Random(seed)) == paraphrase(head, random.Random(seed))


def test_training_captions_mix_canonical_and_paraphrase_at_the_documented_share(seed):
    rng = random.Random(seed)
    heads = training_combinations()
    canonical_texts = {caption(h, phrasing) for h in heads for phrasing in range(len(PHRASINGS))}
    drawn = [(h, caption(h, rng=rng)) for h in rng.choices(heads, k=4000)]
    mixed = [training_text(text, h, rng) for h, text in drawn]
    kept = [a == b for a, (_, b) in zip(mixed, drawn)]
    assert sum(kept) / len(kept) == pytest.approx(CANONICAL_SHARE, abs=0.03)
    assert not any(text in canonical_texts for text, same in zip(mixed, kept) if not same)
    with pytest.raises(ValueError, match=r"^captions must be one of \('canonical', 'paraphrase'\), got 'paraphrases'$"):
        check_captions("paraphrases")
    assert check_captions("paraphrase") == "paraphrase"
    prompts = training_prompts("paraphrase")
    assert prompts[:len(heads) * len(PHRASINGS)] == training_prompts()  # the canonical ones, then paraphrases
    assert len(prompts) == len(heads) * (len(PHRASINGS) + PARAPHRASES_PER_COMBINATION)
    assert not set(prompts[len(heads) * len(PHRASINGS):]) & canonical_texts


def test_the_tokenizer_holds_every_training_word_as_one_token(tmp_path, seed):
    rng = random.Random(seed)
    heads = all_combinations()
    texts = [paraphrase(rng.choice(heads), rng).text for _ in range(3000)]
    vocabulary = caption_words("paraphrase")
    assert {w for t in texts for w in words_of(t)} <= set(vocabulary)
    assert set(caption_words()) < set(vocabulary)
    tokenizer = write_clip_tokenizer(tmp_path / "tokenizer", vocabulary)
    for word in vocabulary:
        assert len(tokenizer(word)["input_ids"]) == 3, word  # start, the word, end
    # The canonical vocabulary still gives the packaged teacher's tokenizer byte for byte.
    canonical = write_clip_tokenizer(tmp_path / "canonical", caption_words())
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "canonical" / name).read_bytes() == (asset_dir("teacher") / "tokenizer" / name).read_bytes()
    assert len(canonical) < len(tokenizer)
    # The packaged teacher holds every canonical word but not the paraphrases' ones, and is refused for them.
    assert missing_words(asset_dir("teacher"), "canonical") == []
    assert "spectacles" in missing_words(asset_dir("teacher"), "paraphrase")
    with pytest.raises(ValueError, match="--teacher: the teacher .* not built for 'paraphrase' captions"):
        check_vocabulary(asset_dir("teacher"), "paraphrase", "--teacher")
    (tmp_path / "tokenizer" / "vocab.json").rename(tmp_path / "vocab.json")
    write_clip_tokenizer(tmp_path / "tokenizer", vocabulary)
    check_vocabulary(tmp_path, "paraphrase", "--teacher")


def test_phrase_regions_keep_their_meaning_on_canonical_captions_and_learn_the_synonyms(seed):
    region = {name: list(MASK_PARTS).index(name) for name in MASK_PARTS}
    nouns = {"hat": "hat", "glasses": "glasses", "beard": "beard", "hair": "hair", "skin": "skin"}
    for head in all_combinations():
        for phrasing in range(len(PHRASINGS)):
            for phrase in split_phrases(caption(head, phrasing)):
                words = set(re.findall(r"[a-z]+", phrase))
                named = [name for name, noun in nouns.items() if noun in words or (name == "skin" and "skinned" in words)]
                assert len(named) <= 1, phrase
                assert phrase_region(phrase) == (region[named[0]] if named else None), phrase
    for phrase, name in [("a navy baseball cap", "hat"), ("a scarlet cap", "hat"), ("Spectacles", "glasses"),
                         ("eyeglasses", "glasses"), ("a bearded man", "beard"), ("a golden-bearded kid", "beard"),
                         ("a ginger-haired lady", "hair"), ("a fair complexion", "skin"), ("olive skin", "skin")]:
        assert phrase_region(phrase) == region[name], phrase
    assert phrase_region("a red-haired woman wearing glasses") is None  # two regions: left unsupervised
    assert phrase_region("a photo of a guy") is None


def synonym_phrases(module) -> dict[str, set[str]]:
    """Every synonym ``module`` writes, by the slot it fills."""
    slots = {f"{name}:{value}": set(phrases) for name, table in module.SYNONYMS.items()
             for value, phrases in table.items()}
    slots["glasses"] = set(module.GLASSES_WORDS)
    slots["hat noun"] = set(module.HAT_NOUNS)
    slots["beard"] = set(getattr(module, "BEARD_WORDS", ()) or module.BEARD_PHRASES)
    slots["bald"] = set(module.BALD_PHRASES) | ({"bald"} if module is train_captions else set())
    return slots


def test_the_held_out_set_uses_unseen_templates_and_a_third_unseen_synonyms(seed):
    rng = random.Random(seed)
    heads = all_combinations()
    training_texts = [paraphrase(rng.choice(heads), rng).text.lower() for _ in range(5000)]
    training_texts += [caption(h, p) for h in heads for p in range(len(PHRASINGS))]
    skeleton = lambda template: re.sub(r"\{[a-z_]+\}", "{}", template)  # noqa: E731
    assert not {skeleton(t) for t in test_set.TEMPLATES} & {skeleton(t) for t in train_captions.TEMPLATES}
    for template in test_set.TEMPLATES:  # each has a stretch of its own that no training caption holds
        literals = [part.strip() for part in re.split(r"\{[a-z_]+\}", template) if part.strip()]
        assert any(all(literal not in text for text in training_texts) for literal in literals), template
    train, held = synonym_phrases(train_captions), synonym_phrases(test_set)
    assert set(held) == set(train)
    unseen = [(slot, phrase) for slot, phrases in held.items() for phrase in phrases if phrase not in train[slot]]
    assert len(unseen) >= sum(map(len, held.values())) / 3
    articles = {"a", "an"}
    for slot, phrase in unseen:
        # never written in training, yet each shares a word with a training synonym of its slot
        assert not any(contains(words_of(text), phrase) for text in training_texts), phrase
        assert set(words_of(phrase)) & {w for p in train[slot] for w in words_of(p)} - articles, phrase


def test_any_closed_vocabulary_tokenizes_each_word_as_one_token(tmp_path, seed):
    rng = random.Random(seed)
    # short words over few letters share many pairs: the case where one word's merges split another
    words = sorted({"".join(rng.choice("abcde") for _ in range(rng.randint(1, 7))) for _ in range(300)})
    tokenizer = write_clip_tokenizer(tmp_path, words)
    merges = (tmp_path / "merges.txt").read_text().strip().split("\n")[1:]
    for word in words:
        ids = tokenizer(word)["input_ids"]
        assert len(ids) == 3 and tokenizer.decode(ids[1:2]).strip() == word, word
        assert bpe(word, merges) == [word + "</w>"], word  # transformers 4's Python BPE agrees
    assert len(tokenizer(" ".join(words))["input_ids"]) == len(words) + 2
