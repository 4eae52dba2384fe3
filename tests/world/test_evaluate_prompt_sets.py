"""The appearance diversity (spread of silhouettes and skin shades against the world's own heads)
by closed forms, and evaluation on any prompt set: each prompt scored against the attributes it
carries, the paraphrase set through the command line, two methods tabulated side by side."""

import json
import math
import random

import numpy as np
import pytest
import torch

from dreamportrait.cli import main
from dreamportrait.world import caption, held_out_combinations
from dreamportrait.world.attributes import HeadAttributes
from dreamportrait.world.comparison import evaluation_captions
from dreamportrait.world.dataset import attribute_indices
from dreamportrait.world.evaluate import (APPEARANCE_FEATURES, SILHOUETTE_SIZE, appearance_diversity,
                                          appearance_features, appearance_spread, diversity_table, evaluate,
                                          mean_pairwise_distance, prompt_skin, silhouettes,
                                          world_method, world_reference)
from dreamportrait.world.heads import BACKGROUND, MASK_PARTS
from dreamportrait.world.paraphrases import paraphrase_test_set

GREY = 2 * BACKGROUND - 1  # the world's background in [-1, 1]


def background(count, resolution=SILHOUETTE_SIZE):
    return torch.full((count, 3, resolution, resolution), GREY)


def test_silhouettes_ramp_from_the_grey_background_to_the_head():
    images = background(3)
    images[1, :, 4:12, 8:24] = -1.0          # a black block: head
    images[2, 0] = GREY + 0.10               # one channel 0.10 from the grey: halfway up the ramp
    images[2, 1] = GREY - 0.04               # within 0.05 of the grey: background
    result = silhouettes(images)
    assert result.shape == (3, SILHOUETTE_SIZE, SILHOUETTE_SIZE)
    assert result[0].abs().max() == 0
    expected = torch.zeros(SILHOUETTE_SIZE, SILHOUETTE_SIZE)
    expected[4:12, 8:24] = 1
    assert torch.equal(result[1], expected)
    torch.testing.assert_close(result[2], torch.full_like(result[2], 0.5))
    doubled = silhouettes(images.repeat_interleave(2, -1).repeat_interleave(2, -2))  # 64² is area-averaged to 32²
    torch.testing.assert_close(doubled, result)


def test_mean_pairwise_distance_against_numpy(seed):
    features = torch.randn(5, 7)
    a = features.double().numpy()
    l1 = np.abs(a[:, None] - a[None]).mean(-1)
    l2 = np.linalg.norm(a[:, None] - a[None], axis=-1)
    assert mean_pairwise_distance(features, 1) == pytest.approx(l1.sum() / 20, rel=1e-9)
    assert mean_pairwise_distance(features, 2) == pytest.approx(l2.sum() / 20, rel=1e-9)
    assert math.isnan(mean_pairwise_distance(features[:1], 2))


def test_appearance_spread_closed_forms(seed):
    rng = random.Random(seed)
    skin = torch.zeros(SILHOUETTE_SIZE, SILHOUETTE_SIZE, dtype=torch.bool)
    skin[10:20, 10:20] = True
    same = background(4)
    same[:, :, 10:20, 10:20] = 0.3
    spread = appearance_spread(same, skin)
    assert spread == {"silhouette": 0.0, "skin_shade": 0.0}  # identical heads: nothing differs
    # Two heads: one a k x k block larger; skin shades c1 and c2 (the same in every channel).
    k, c1, c2 = rng.randint(1, 9), rng.uniform(-0.9, 0.2), rng.uniform(-0.9, 0.2)
    pair = background(2)
    pair[0, :, 10:20, 10:20], pair[1, :, 10:20, 10:20] = c1, c2
    pair[1, :, 0:k, 0:k] = -1.0
    features = appearance_features(pair, skin)
    torch.testing.assert_close(features["skin_shade"], torch.tensor([[(c1 + 1) / 2] * 3, [(c2 + 1) / 2] * 3]))
    spread = appearance_spread(pair, skin)
    assert spread["silhouette"] == pytest.approx(k * k / SILHOUETTE_SIZE ** 2, rel=1e-6)
    assert spread["skin_shade"] == pytest.approx(math.sqrt(3) * abs(c1 - c2) / 2, rel=1e-5)
    no_skin = appearance_spread(pair, torch.zeros_like(skin))  # a prompt without skin pixels: no shade
    assert math.isnan(no_skin["skin_shade"]) and no_skin["silhouette"] == spread["silhouette"]


def test_appearance_diversity_is_each_features_summed_spread_over_the_worlds(seed):
    rng = random.Random(seed)
    world = [{f: rng.uniform(0.01, 1) for f in APPEARANCE_FEATURES} for _ in range(5)]
    scale = {f: rng.uniform(0.1, 3) for f in APPEARANCE_FEATURES}
    method = [{f: s[f] * scale[f] for f in APPEARANCE_FEATURES} for s in world]
    ratio, ratios = appearance_diversity(method, world)
    assert ratios == pytest.approx(scale, rel=1e-9)
    assert ratio == pytest.approx(sum(scale.values()) / len(scale), rel=1e-9)
    assert appearance_diversity(world, world)[0] == pytest.approx(1, rel=1e-12)
    assert appearance_diversity([dict.fromkeys(APPEARANCE_FEATURES, 0.0)] * 5, world)[0] == 0
    # A prompt whose skin shade is NaN leaves that feature's sums, not the silhouette's.
    method[0]["skin_shade"] = float("nan")
    _, ratios = appearance_diversity(method, world)
    kept = sum(s["skin_shade"] for s in method[1:]) / sum(s["skin_shade"] for s in world[1:])
    assert ratios["skin_shade"] == pytest.approx(kept, rel=1e-9)
    assert ratios["silhouette"] == pytest.approx(scale["silhouette"], rel=1e-9)


def test_prompt_skin_is_the_skin_every_world_head_of_the_prompt_covers(seed):
    head = random.Random(seed).choice(held_out_combinations())
    images, masks = world_reference(head, [0, 1, 2], views=3, resolution=16)
    assert images.shape == (3, 3, 16, 16) and masks.shape == (3, len(MASK_PARTS), 16, 16)
    skin = prompt_skin(masks)
    part = masks[:, list(MASK_PARTS).index("skin")]
    assert torch.equal(skin, (part >= 0.9).all(0)) and 0 < skin.sum() < 16 * 16
    for views in (2, 3, 4):  # the frontal view of world_method, bit for bit
        frontal = world_reference(head, [1], views=views, resolution=16)[0][0]
        assert torch.equal(frontal, world_method(views, resolution=16)(caption(head, 0), 1)["image"][views // 2])


class Judge:
    """Reads every view as the attribute classes ``truth`` names for its prompt; features: channel means."""

    def __init__(self, verdicts):
        self.verdicts = iter(verdicts)

    def eval(self):
        return self

    def predict(self, views):
        return next(self.verdicts).expand(views.shape[0], -1)

    def features(self, views):
        return views.mean((2, 3))


class Real:
    def float_images(self):
        return torch.rand(8, 3, 8, 8) * 2 - 1


def test_the_world_against_itself_scores_one_and_identical_heads_zero(seed):
    captions = paraphrase_test_set()[:2]
    prompts, heads = [c.text for c in captions], [c.attributes for c in captions]
    seeds, views = [3, 5, 8], 3
    truth = attribute_indices(heads)
    verdicts = lambda: [truth[p] for p in range(2) for _ in seeds]  # noqa: E731
    world = world_method(views, resolution=16, attributes=dict(zip(prompts, heads)))
    result = evaluate(world, prompts, seeds, Judge(verdicts()), Real(), progress=False, attributes=heads)
    assert result["appearance_diversity"] == pytest.approx(1, rel=1e-6)
    assert result["appearance_spread"] == pytest.approx(result["world_appearance_spread"], rel=1e-6)
    assert all(result["text_alignment"][a] == 1 for a in result["text_alignment"])
    assert result["depth_error"] == pytest.approx(0, abs=1e-6)  # the prompt's own heads, from its attributes
    # The world's heads in another order of seeds: the same spread.
    shuffled = lambda p, s: world(p, seeds[(seeds.index(s) + 1) % len(seeds)])  # noqa: E731
    result = evaluate(shuffled, prompts, seeds, Judge(verdicts()), Real(), progress=False, attributes=heads)
    assert result["appearance_diversity"] == pytest.approx(1, rel=1e-6)
    # One head for every seed: nothing differs.
    result = evaluate(lambda p, s: world(p, seeds[0]), prompts, seeds, Judge(verdicts()), Real(), progress=False,
                      attributes=heads)
    assert result["appearance_diversity"] == 0 and result["world_appearance_spread"]["silhouette"] > 0
    assert diversity_table([result]).splitlines()[-1].startswith("| method | – | 0.000 | 0.00 | 0.00 | 0.00 |")
    one_seed = evaluate(world, prompts, seeds[:1], Judge(verdicts()), Real(), progress=False, attributes=heads)
    assert "appearance_diversity" not in one_seed and diversity_table([one_seed]).count("\n") == 4


def test_evaluate_scores_each_prompt_against_the_attributes_it_carries():
    # A prompt that names no attribute the canonical parser reads, scored against given attributes.
    head, other = HeadAttributes("red", "dark", "long", "no", "yes", "blue"), held_out_combinations()[0]
    judge = Judge([attribute_indices([head])[0]] * 2)
    image = lambda p, s: {"image": torch.rand(2, 3, 8, 8) * 2 - 1}  # noqa: E731
    result = evaluate(image, ["someone, somewhere"], [0, 1], judge, Real(), progress=False, attributes=[head])
    assert set(result["text_alignment"].values()) == {1.0}
    judge = Judge([attribute_indices([head])[0]] * 2)
    result = evaluate(image, ["someone, somewhere"], [0, 1], judge, Real(), progress=False, attributes=[other])
    differs = {a: getattr(head, a) == getattr(other, a) for a in result["text_alignment"]}
    assert result["text_alignment"] == {a: float(same) for a, same in differs.items()}
    with pytest.raises(ValueError, match=r"^attributes: expected one per prompt \(1\), got 2$"):
        evaluate(image, ["a"], [0], judge, Real(), progress=False, attributes=[head, head])
    with pytest.raises(ValueError, match="caption names no skin tone"):  # without attributes: parsed
        evaluate(image, ["someone, somewhere"], [0], judge, Real(), progress=False)


def test_evaluation_captions_pick_the_same_combinations_from_either_set():
    canonical, paraphrased = evaluation_captions(held_out=5), evaluation_captions(held_out=5, prompt_set="paraphrase")
    assert [c.attributes for c in canonical] == [c.attributes for c in paraphrased]
    assert [c.text for c in canonical] == [caption(c.attributes, 0) for c in canonical]
    texts = {c.text: c for c in paraphrase_test_set()}
    assert all(texts[c.text] == c for c in paraphrased)
    mixed = evaluation_captions([caption(held_out_combinations()[3], 1)], held_out=1, prompt_set="paraphrase")
    assert mixed[0].attributes == held_out_combinations()[3] and mixed[1] == paraphrase_test_set()[0]
    with pytest.raises(ValueError, match=r"^--prompt-set must be one of \('canonical', 'paraphrase'\), got 'para'$"):
        evaluation_captions(held_out=1, prompt_set="para")
    with pytest.raises(ValueError, match="^--prompt-set paraphrase picks the held-out prompts: give --held-out N"):
        evaluation_captions(["a portrait of a dark-skinned person with a bald head"], prompt_set="paraphrase")


def test_evaluate_cli_compares_two_methods_on_the_paraphrase_set(tmp_path, capsys):
    common = ["--held-out", "2", "--seeds", "0-1", "--views", "2", "--real-count", "16", "--out", str(tmp_path)]
    assert main(["evaluate", "--method", "world", "--prompt-set", "paraphrase", "--name", "world-paraphrase",
                 *common]) == 0
    assert main(["evaluate", "--method", "world", "--name", "world-canonical", *common]) == 0
    paraphrased = json.loads((tmp_path / "world-paraphrase.json").read_text())
    canonical = json.loads((tmp_path / "world-canonical.json").read_text())
    assert (paraphrased["prompt_set"], canonical["prompt_set"]) == ("paraphrase", "canonical")
    # The same heads either way (the packaged judge reads the world's renders right): the prompts' words differ only.
    assert paraphrased["text_alignment"] == canonical["text_alignment"]
    assert min(paraphrased["text_alignment"].values()) > 0.9
    assert paraphrased["appearance_diversity"] == pytest.approx(1, rel=1e-6)
    table = (tmp_path / "results.md").read_text()
    rows = table.split("diversity within a prompt")[1].split("\n\n")[1].splitlines()
    assert rows[2].startswith("| world-canonical | canonical | ") and rows[3].startswith("| world-paraphrase | paraphrase | ")
    capsys.readouterr()
    assert main(["evaluate", "--method", "world", "--prompt-set", "paraphrase", "--out", str(tmp_path)]) == 2
    assert "--prompt-set paraphrase picks the held-out prompts" in capsys.readouterr().err


def test_diversity_table_writes_each_measure_in_its_column():
    result = {"method": "m", "prompt_set": "paraphrase", "diversity": 0.6341, "appearance_diversity": 0.781,
              "appearance_diversity_per_feature": {"silhouette": 0.7849, "skin_shade": 0.7711},
              "appearance_spread": {"silhouette": 0.01234, "skin_shade": 0.00056},
              "world_appearance_spread": {"silhouette": 0.02, "skin_shade": 0.0007}}
    assert diversity_table([result, {"method": "one seed", "diversity": 0.0}]).splitlines()[2:] == [
        "| method | prompts | diversity | appearance diversity | silhouette | skin shade | "
        "spread (silhouette, skin shade) | world's spread |",
        "|---|---|---|---|---|---|---|---|",
        "| m | paraphrase | 0.634 | 0.78 | 0.78 | 0.77 | 0.0123, 0.0006 | 0.0200, 0.0007 |"]


def test_spreads_are_averaged_over_the_prompts_that_have_one():
    from dreamportrait.world.evaluate import _mean

    assert _mean([1.0, float("nan"), 4.0, 7.0]) == 4.0
    assert math.isnan(_mean([float("nan")])) and math.isnan(_mean([]))
