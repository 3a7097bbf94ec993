import pytest
import torch

from modelpress.algorithms.prune.masks import (
    NMPattern,
    global_masks,
    is_nm,
    layer_mask,
    nm_mask,
    pruned_count,
    resolve_sparsity,
    row_mask,
)
from modelpress.errors import ModelpressError


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.73, 0.99])
@pytest.mark.parametrize("shape", [(7, 13), (32, 96)])
def test_layer_mask_prunes_exact_count_of_lowest(sparsity, shape):
    torch.manual_seed(0)
    score = torch.randn(shape).abs()
    keep = layer_mask(score, sparsity)
    assert int((~keep).sum()) == pruned_count(score.numel(), sparsity)
    if keep.any() and (~keep).any():
        assert score[keep].min() >= score[~keep].max()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_row_mask_prunes_the_same_count_in_every_row(sparsity):
    torch.manual_seed(1)
    score = torch.randn(11, 40)
    keep = row_mask(score, sparsity)
    assert ((~keep).sum(dim=1) == pruned_count(40, sparsity)).all()
    for r in range(11):
        assert score[r][keep[r]].min() >= score[r][~keep[r]].max()


@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4"])
def test_nm_mask_keeps_the_n_largest_of_every_group(spec):
    pattern = NMPattern.parse(spec)
    torch.manual_seed(2)
    score = torch.randn(6, 32)
    keep = nm_mask(score, pattern)
    assert is_nm(keep, pattern)
    groups = keep.reshape(6, -1, pattern.m)
    assert (groups.sum(-1) == pattern.n).all()
    s = score.reshape(6, -1, pattern.m)
    reference = torch.zeros_like(groups)
    for r in range(6):
        for g in range(s.shape[1]):
            reference[r, g, torch.topk(s[r, g], pattern.n).indices] = True
    assert torch.equal(groups, reference)
    assert keep.float().mean().item() == pytest.approx(1 - pattern.sparsity)


def test_is_nm_rejects_a_group_with_too_many_weights():
    mask = torch.tensor([[True, True, True, False, True, False, False, False]])
    assert not is_nm(mask, NMPattern(2, 4))
    assert is_nm(mask, NMPattern(3, 4))


def test_global_masks_use_one_threshold_and_exact_count_even_with_ties():
    torch.manual_seed(3)
    scores = {"a": torch.randint(0, 5, (10, 10)).float(), "b": torch.randint(0, 5, (3, 50)).float() * 0.5}
    for sparsity in (0.3, 0.5, 0.77):
        masks = global_masks(scores, sparsity)
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert pruned == pruned_count(250, sparsity)
        kept = torch.cat([scores[n][masks[n]] for n in scores])
        dropped = torch.cat([scores[n][~masks[n]] for n in scores])
        assert kept.min() >= dropped.max()


def test_global_masks_differ_from_per_layer_when_layers_differ_in_scale():
    scores = {"small": torch.rand(8, 8) * 0.1, "large": torch.rand(8, 8) + 1}
    masks = global_masks(scores, 0.5)
    assert not masks["small"].any() and masks["large"].all()


def test_pattern_and_sparsity_validation():
    assert NMPattern.parse("2:4").sparsity == 0.5
    assert resolve_sparsity(None, NMPattern(2, 4)) == 0.5
    for bad in ("4:2", "2-4", "a:b", "0:4"):
        with pytest.raises(ModelpressError):
            NMPattern.parse(bad)
    with pytest.raises(ModelpressError, match="disagrees"):
        resolve_sparsity(0.3, NMPattern(2, 4))
    for bad in (0, 1, 1.5, -0.1, None, True):
        with pytest.raises(ModelpressError):
            resolve_sparsity(bad, None)
    with pytest.raises(ModelpressError, match="groups of 4"):
        nm_mask(torch.rand(2, 10), NMPattern(2, 4))
