"""Position-table interpolation from a non-square grid and in half precision (issue 14, blind spot 8).

tests/test_model.py interpolates only from the square 5×5 table of tiny_config in float32, where a
height/width swap in the (gh, gw) reshape or a half-precision table that is never cast back cannot
show. Here the trained grid is 9×7 (stage2-nonsquare): tables whose values vary along one axis only
must keep that structure through the resize (an independent oracle: bicubic weights sum to 1, and an
unchanged axis is an identity), the model's first hidden state must be the patch tokens plus the
interpolated table, and float16/bfloat16 tables follow the tolerance idiom against float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import TINY_CASES, randomize_
from tests.tolerance import assert_close_to_reference

TRAINED_GRID = (9, 7)  # stage2-nonsquare: 72×56 pixels → a 9×7 feature grid


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(TINY_CASES["stage2-nonsquare"]))
    randomize_(model)
    return model.eval()


def _set_patch_table(model, grid_values: torch.Tensor) -> None:
    """Write a (gh, gw, dim) table of patch positions (the CLS row keeps its value)."""
    table = model.vit.embeddings.position_embeddings
    with torch.no_grad():
        table[0, 1:] = grid_values.reshape(-1, table.shape[-1]).to(table.dtype)


@pytest.mark.parametrize("target", [(9, 3), (9, 12), (4, 7), (13, 7)])  # one axis changes, the other stays
def test_unchanged_axis_is_identity_and_constant_axis_stays_constant(model, target):
    model = copy.deepcopy(model)
    gh, gw = TRAINED_GRID
    dim = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    by_row = torch.randn(gh, 1, dim, generator=g).expand(gh, gw, dim)  # varies with the row only
    by_col = torch.randn(1, gw, dim, generator=g).expand(gh, gw, dim)  # varies with the column only
    emb = model.vit.embeddings
    for values, axis in ((by_row, 0), (by_col, 1)):
        _set_patch_table(model, values)
        with torch.no_grad():
            table = emb.interpolate_pos_encoding(target)
        assert table.shape == (1, 1 + target[0] * target[1], dim)
        assert torch.equal(table[:, 0], emb.position_embeddings[:, 0])  # CLS untouched
        out = table[0, 1:].reshape(*target, dim)
        if target[axis] == TRAINED_GRID[axis]:  # the varying axis is not resized: values carried over
            expected = values[:, :1] if axis == 0 else values[:1, :]
            torch.testing.assert_close(out, expected.expand(*target, dim), rtol=0, atol=1e-5)
        else:  # the varying axis is resized, the constant one stays constant along itself
            spread = out.amax(dim=1 - axis) - out.amin(dim=1 - axis)
            assert spread.abs().max().item() <= 1e-5, "a row-only (column-only) table picked up column (row) detail"


def test_first_hidden_state_is_tokens_plus_interpolated_table(model):
    pixels = torch.randn(2, 3, 130, 50, generator=torch.Generator().manual_seed(2))  # non-square, another grid
    emb = model.vit.embeddings
    with torch.no_grad():
        tokens, grid = emb.patch_embeddings(pixels)
        out = model(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        gh, gw = TRAINED_GRID
        patch_table = emb.position_embeddings[:, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        resized = torch.nn.functional.interpolate(patch_table, size=grid, mode="bicubic", align_corners=False)
        table = torch.cat([emb.position_embeddings[:, :1], resized.flatten(2).transpose(1, 2)], dim=1)
        expected = torch.cat([emb.cls_token.expand(2, -1, -1), tokens], dim=1) + table
    assert grid != TRAINED_GRID and grid[0] != grid[1]
    assert out.hidden_states[0].shape == expected.shape
    torch.testing.assert_close(out.hidden_states[0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_table_follows_the_tolerance_idiom(model, dtype):
    half = copy.deepcopy(model).to(dtype)
    emb = half.vit.embeddings
    target = (12, 5)
    with torch.no_grad():
        table = emb.interpolate_pos_encoding(target)
        assert table.dtype == dtype  # cast back: the model adds it to dtype tokens
        # plain torch in the same dtype, and float64, from the same (rounded) half-precision table
        gh, gw = TRAINED_GRID
        patch = emb.position_embeddings[:, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        plain = torch.nn.functional.interpolate(patch, size=target, mode="bicubic", align_corners=False)
        exact = torch.nn.functional.interpolate(patch.double(), size=target, mode="bicubic", align_corners=False)
    flat = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731
    assert_close_to_reference(table[:, 1:], flat(plain), flat(exact), dtype, what=f"{dtype} interpolated table")
    assert torch.equal(table[:, 0], emb.position_embeddings[:, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_at_another_size(model, dtype):
    pixels = torch.randn(1, 3, 130, 50, generator=torch.Generator().manual_seed(3))
    half = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(pixels.double(), interpolate_pos_encoding=True).logits
        plain = copy.deepcopy(model)(pixels, interpolate_pos_encoding=True).logits  # float32 peer
        out = half(pixels.to(dtype), interpolate_pos_encoding=True)
    assert out.logits.dtype == dtype
    # the whole model in half precision: the idiom against float32 plain torch would be too strict, so the
    # bound is the half dtype's own tolerance on logits of this size (a missing cast or a swapped axis
    # is off by far more)
    assert_close_to_reference(out.logits, plain, exact, dtype, factor=2.0, atol_scale=4.0, what="half logits")
