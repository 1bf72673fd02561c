"""Heatmaps: the head's attention map, the exact correspondence decomposition, attention on the object."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modeling_nearid import NearIDModel
from nearid import heatmaps


@pytest.fixture
def head(tiny_siglip):
    torch.manual_seed(0)
    model = NearIDModel.from_siglip(tiny_siglip)
    with torch.no_grad():  # a head away from its initialisation: biases non-zero, so their terms count
        for parameter in model.head.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.head.eval()


def test_attention_weights_are_those_of_multihead_attention(head):
    tokens = torch.randn(2, 225, 32)
    ours = head.attention_weights(tokens)  # [B, T, H]
    probe = head.probe.expand(2, -1, -1)
    _, reference = head.attention(probe, tokens, tokens, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(ours, reference[:, :, 0].transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_attention_map_is_the_head_mean_and_sums_to_one(head):
    tokens = torch.randn(3, 225, 32)
    attention = heatmaps.attention_map(head, tokens)
    assert attention.shape == (3, 225)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3))
    torch.testing.assert_close(attention, heatmaps.attention_map(head, tokens, per_head=True).mean(-1))


def test_forward_is_unchanged_by_the_split_into_attention_output(head):
    tokens = torch.randn(2, 225, 32)
    hidden = head.attention.out_proj(head._pool(tokens))
    torch.testing.assert_close(head(tokens), hidden + head.mlp(head.layernorm(hidden)))
    torch.testing.assert_close(head.attention_output(tokens), hidden)


@pytest.mark.parametrize("num_references", [1, 3])
def test_correspondence_shares_sum_exactly_to_the_attention_stage_cosine(head, num_references):
    generated, references = torch.randn(4, 225, 32), torch.randn(num_references, 225, 32)
    result = heatmaps.correspondence_map(head, generated, references)
    assert result.shares.shape == (4, 225) and result.shares.dtype == torch.float64
    # float64 throughout: the decomposition holds to rounding (1e-12), not to float32's 1e-6
    torch.testing.assert_close(result.shares.sum(-1) + result.bias, result.cosine, atol=1e-12, rtol=0)
    # and the cosine is the attention stage's own, against the mean output of the references
    expected = F.cosine_similarity(head.attention_output(generated),
                                   head.attention_output(references).mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(result.cosine.float(), expected.detach(), atol=1e-5, rtol=0)
    assert result.bias.abs().max() > 0 and result.shares.std() > 0


def test_mask_to_grid_keeps_patches_mostly_inside():
    mask = np.zeros((30, 30), np.uint8)
    mask[:, :15] = 255  # the left half: column 0 is inside, column 1 exactly half (not mostly), column 2 outside
    grid = heatmaps.mask_to_grid(Image.fromarray(mask), 3)
    assert grid.tolist() == [[True, False, False]] * 3
    mask[:, :16] = 255
    assert heatmaps.mask_to_grid(mask, 3).tolist() == [[True, True, False]] * 3


def test_object_attention_share():
    attention = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    inside = np.array([[[True, False], [False, True]], [[True, True], [True, False]]])
    assert heatmaps.object_attention_share(attention, inside).tolist() == [0.5, 0.75]


def test_overlay_marks_where_the_map_is_high():
    image = np.full((40, 60, 3), 128, np.uint8)
    grid = np.zeros((3, 3), np.float32)
    grid[0, 2] = 1.0  # top right
    drawn = heatmaps.overlay(image, grid, size=60)
    assert drawn.shape == (40, 60, 3) and drawn.dtype == np.uint8
    assert drawn[5, 55].sum() > drawn[35, 5].sum() + 100
    signed = heatmaps.overlay(image, -grid, signed=True, size=60)
    assert signed[5, 55, 2] > signed[5, 55, 0] + 100  # negative is blue


def test_grid_side_refuses_a_non_square_grid():
    with pytest.raises(ValueError, match="square patch grid, got 10"):
        heatmaps.grid_side(10)
