"""The quantisers against what each promises: GPTQ lowers the output error round-to-nearest leaves on the
calibration inputs it was given, its searched grid clips outliers where that lowers the weighted error, hqq
lowers the weight error, and a tied table's Hessian is the input of the logits projection (the final hidden
states), so GPTQ can fit the table for the output it feeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from pipeline.export import weights as w
from pipeline.model.calibration import input_hessians

RNG = np.random.default_rng(0)
WEIGHT = RNG.standard_normal((48, 64)).astype(np.float32)
# Correlated inputs with a few strong features, as transformer activations have.
INPUTS = RNG.standard_normal((512, 64)) @ (np.eye(64) + 0.5 * RNG.standard_normal((64, 64)))
INPUTS[:, :4] *= 8


def _output_error(q: w.BlockQuant) -> float:
    return float(np.linalg.norm(INPUTS @ (WEIGHT - q.dequantize()).T))


@pytest.mark.parametrize("form", ["symmetric", "offset"])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_output_error_is_below_round_to_nearest_on_its_calibration_inputs(form, bits):
    rtn = w.rtn(WEIGHT, bits, 16, form)
    gptq = w.gptq(WEIGHT, INPUTS.T @ INPUTS, bits, 16, form)
    assert gptq.codes.max() < 2 ** bits
    assert _output_error(gptq) < 0.8 * _output_error(rtn)


@pytest.mark.parametrize("form", ["symmetric", "asymmetric", "offset"])
def test_the_searched_grid_clips_the_tails_of_wide_blocks_when_that_lowers_the_error(form):
    x = RNG.standard_normal((16, 4, 128))  # the largest of 128 normal values sits near 2.6 sigma: its step is coarse
    plain, searched = w._grid(x, 4, form), w._searched_grid(x, 4, form, np.ones(128))

    def block_error(grid):
        return ((x - w._rounded(x, grid, 4)) ** 2).sum(-1)
    assert np.all(block_error(searched) <= block_error(plain) + 1e-12)  # shrink 1 (the plain grid) is a candidate
    assert block_error(searched).sum() < 0.95 * block_error(plain).sum()
    assert np.mean(np.abs(searched[0]) < np.abs(plain[0])) > 0.5  # most blocks took a finer step


def test_the_searched_grid_keeps_an_important_inputs_outlier():
    x = RNG.standard_normal((8, 1, 128))
    x[:, 0, 5] = 12.0
    flat, heavy = np.ones(128), np.where(np.arange(128) == 5, 1e4, 1.0)

    def outlier_error(importance):
        grid = w._searched_grid(x, 4, "symmetric", importance)
        return np.abs(x - w._rounded(x, grid, 4))[:, 0, 5].max()
    assert outlier_error(heavy) < 0.1 < outlier_error(flat)  # clipped when it counts as one of 128, not at 1e4


def test_hqq_weight_error_is_at_most_its_min_max_start_in_every_block():
    start, fitted = w.rtn(WEIGHT, 4, 16, "offset"), w.hqq(WEIGHT, 4, 16)

    def block_errors(q):
        return ((q.dequantize() - WEIGHT) ** 2).reshape(48, -1, 16).sum(-1)
    assert np.all(block_errors(fitted) <= block_errors(start) + 1e-9)
    assert block_errors(fitted).sum() < 0.95 * block_errors(start).sum()


def test_a_tied_tables_hessian_is_the_logits_projections_input():
    model = tiny_model("llama")
    assert model.config.tie_word_embeddings
    windows = np.random.default_rng(1).integers(3, 256, (3, 12))
    hessians = input_hessians(model, windows, batch_size=2)
    with torch.inference_mode():
        hidden = model.model(input_ids=torch.from_numpy(windows).long()).last_hidden_state.double()
    x = hidden.reshape(-1, hidden.shape[-1]).numpy()
    np.testing.assert_allclose(hessians["embedding"], x.T @ x, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("bits,form", [(4, "symmetric"), (4, "asymmetric"), (4, "offset"), (8, "offset")])
def test_fitted_weights_read_back_from_disk_exactly(bits, form, tmp_path):
    from pipeline.export.fits import FitCache

    q = w.rtn(WEIGHT[:, :40], bits, 16, form)  # 40 inputs: the last block is padded
    cache, calls = FitCache(tmp_path), []
    for _ in range(2):
        got = cache.get("layers.0.o", "fmt", lambda: calls.append(1) or q)
        assert np.array_equal(got.dequantize(), q.dequantize()) and np.array_equal(got.codes, q.codes)
        assert (got.bits, got.block_size, got.k) == (bits, 16, 40)
    assert len(calls) == 1
    (tmp_path / "layers.0.o.fmt.npz").write_bytes(b"damaged")
    assert np.array_equal(cache.get("layers.0.o", "fmt", lambda: q).codes, q.codes)  # fitted again
