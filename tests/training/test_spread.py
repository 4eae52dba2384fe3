"""The diversity-sensitive term of gan.spread_weight: group spread and its hinge (its use: test_trainer)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dreamportrait.training.losses import group_spread, spread_loss


def explicit_spread(images, group_size, size):
    """Group spread by an explicit loop over the pairs of each group (member-major layout)."""
    groups = images.shape[0] // group_size
    pool = images.shape[-1] // size
    pooled = F.avg_pool2d(images, pool) if pool > 1 else images
    spreads = []
    for g in range(groups):
        members = [pooled[m * groups + g] for m in range(group_size)]
        pairs = list(itertools.combinations(members, 2))
        spreads.append(sum((a - b).abs().mean() for a, b in pairs) / len(pairs))
    return torch.stack(spreads)


@pytest.mark.parametrize("group_size,groups,size", [(2, 3, 8), (4, 2, 2), (3, 1, 4)])
def test_group_spread_is_the_mean_pairwise_difference_within_each_group(group_size, groups, size):
    images = torch.rand(group_size * groups, 3, 8, 8) * 2 - 1
    assert torch.allclose(group_spread(images, group_size, size), explicit_spread(images, group_size, size),
                          atol=1e-6)
    # Groups of one image repeated have no spread, however different the groups are.
    repeated = images[:groups].repeat(group_size, 1, 1, 1)
    assert torch.equal(group_spread(repeated, group_size, size), torch.zeros(groups))


def test_pooling_keeps_per_pixel_noise_from_counting_as_spread():
    head = torch.rand(1, 3, 16, 16)
    checkerboard = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 0.2 - 0.1  # averages out in 4x4
    noisy = torch.cat([head, head + checkerboard])
    assert group_spread(noisy, 2, size=16).item() == pytest.approx(0.1, abs=1e-6)
    assert group_spread(noisy, 2, size=4).item() == pytest.approx(0.0, abs=1e-6)
    # The default pools the world's 64² images 4x4 and its 32² raw renders 2x2, to the same 16².
    for side in (64, 32):
        board = (torch.arange(side)[:, None] + torch.arange(side)[None]) % 2 * 0.2 - 0.1
        image = torch.rand(1, 3, side, side)
        assert group_spread(torch.cat([image, image + board]), 2).item() == pytest.approx(0.0, abs=1e-6)
    # Images smaller than the pooled side are compared as they are; sides that do not pool evenly are refused.
    assert group_spread(noisy[..., :8, :8], 2).item() == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match=r"images of 24x24 pixels do not pool evenly to 16x16"):
        group_spread(torch.rand(2, 3, 24, 24), 2)


def test_the_hinge_pushes_members_apart_only_below_the_target():
    images = (torch.rand(4, 3, 8, 8) * 0.02).requires_grad_(True)  # one group of 4 nearly equal images
    spread = group_spread(images, 4)
    loss = spread_loss(spread, target=0.5)
    assert loss.item() == pytest.approx(0.5 - spread.item(), abs=1e-6)
    loss.backward()
    # A small step down the gradient increases the spread (the members move apart).
    assert group_spread(images.detach() - 0.01 * images.grad.sign(), 4).item() > spread.item()
    assert spread_loss(spread.detach(), target=0.5 * spread.item()).item() == 0.0  # no push once varied enough
