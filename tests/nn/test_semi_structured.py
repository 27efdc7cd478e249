"""2:4 layers on torch's semi-structured sparse tensors: detection, the swap in and out around
inference, and refusal off CUDA. The sparse kernels themselves run on a GPU only (last test)."""

from __future__ import annotations

import pytest
import torch

import kernels._tune

from effopt.methods.pruning.masks import masks_from_scores, nm_mask
from effopt.nn import semi_structured as S
from effopt.nn.masked_linear import MaskedLinear, apply_mask
from effopt.nn.runtime import use_runtime

from conftest import tiny_llama

ON_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def two_four_weight(rows=64, cols=128, dtype=torch.float32, device="cpu", seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return (w * nm_mask(w.abs().float(), 2, 4)).to(device)


def pruned_llama(pattern="2:4", **shape):
    model = tiny_llama(**shape).eval()
    linears = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    masks = masks_from_scores({n: w.abs() for n, w in linears.items()}, None, (2, 4) if pattern == "2:4" else (4, 8))
    for name, keep in masks.items():
        apply_mask(model, name, keep, pattern)
    return model


def test_two_four_detection():
    w = two_four_weight()
    assert S.is_two_four(w)
    w[5, 8:12] = 1.0  # one group of four with no zero
    assert not S.is_two_four(w)
    assert not S.is_two_four(torch.zeros(4, 6))  # inputs not a multiple of 4


def test_off_cuda_the_layer_is_refused_by_name():
    assert "CUDA" in S.unsupported_reason(two_four_weight(dtype=torch.float16))
    with pytest.raises(ValueError, match="SemiStructuredLinear: on cpu"):
        S.SemiStructuredLinear(two_four_weight(dtype=torch.float16), None)


def test_runtime_option_on_cpu_leaves_every_layer_dense_and_says_why():
    model = pruned_llama()
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with S.use_semi_structured(model, {"semi_structured": True}) as skipped:
            assert len(skipped) == 14 and all("CUDA" in r for r in skipped.values())
            assert sum(isinstance(m, MaskedLinear) for m in model.modules()) == 14
            assert torch.equal(model(input_ids=ids).logits, ref)
        with S.use_semi_structured(model, {}) as skipped:  # option off: nothing looked at
            assert skipped == {}


def test_only_two_four_masked_layers_are_candidates():
    assert len(S.two_four_layers(pruned_llama("2:4"))) == 14
    assert S.two_four_layers(pruned_llama("4:8")) == {}
    assert S.two_four_layers(tiny_llama()) == {}


def test_swap_in_and_back_out(monkeypatch):
    """The swap logic with torch's compression replaced by the identity (CPU has no sparse kernels):
    inside the block every 2:4 layer is a SemiStructuredLinear computing the masked product; after
    it, the very same MaskedLinear objects are back."""
    monkeypatch.setattr(S, "unsupported_reason", lambda w: None if S.is_two_four(w) else "dense")
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: w.clone())
    monkeypatch.setattr(kernels._tune, "choose", lambda key, cands, run: "sparse")  # no GPU to time on
    model = pruned_llama()
    before = dict(S.two_four_layers(model))
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with use_runtime(model, {"semi_structured": True}):
            swapped = [m for m in model.modules() if isinstance(m, S.SemiStructuredLinear)]
            assert len(swapped) == 14 and not any(isinstance(m, MaskedLinear) for m in model.modules())
            assert not any(p.requires_grad for m in swapped for p in m.parameters())
            torch.testing.assert_close(model(input_ids=ids).logits, ref)
    assert S.two_four_layers(model) == before
    assert all(model.get_submodule(n) is m for n, m in before.items())


def test_a_layer_the_backend_refuses_stays_dense(monkeypatch):
    monkeypatch.setattr(S, "unsupported_reason", lambda w: None)

    def refuse(w):
        raise RuntimeError("Error original_tensor.shape is not supported!\nmore")
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", refuse)
    model = pruned_llama()
    swapped, skipped = S.sparsify(model)
    assert swapped == {} and set(skipped.values()) == {"Error original_tensor.shape is not supported!"}



def test_a_backend_that_builds_but_cannot_run_leaves_the_layer_dense(monkeypatch):
    """torch's CUTLASS tensors build on sm_90 and fail at the first product: the probe catches that."""
    monkeypatch.setattr(S, "unsupported_reason", lambda w: None)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: w.clone())

    def cannot_run(self, x):
        raise RuntimeError("sparse_semi_structured_mad_op : Supported only on GPUs with compute capability 8.x")
    monkeypatch.setattr(S.SemiStructuredLinear, "sparse_forward", cannot_run)
    model = pruned_llama()
    before = dict(S.two_four_layers(model))
    swapped, skipped = S.sparsify(model)
    assert swapped == {} and len(skipped) == 14 and all("capability 8.x" in r for r in skipped.values())
    assert all(model.get_submodule(n) is m for n, m in before.items())


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_the_layer_runs_the_path_the_tuner_picks_per_shape_and_token_bucket(monkeypatch, path):
    """With a dense fallback the layer asks the tuner once per (shape, power-of-two tokens) and runs its
    pick. The 'compressed' weight here is all zeros, so the two paths give different products."""
    monkeypatch.setattr(S, "unsupported_reason", lambda w: None)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", torch.zeros_like)
    keys = []

    def pick(key, cands, run):
        keys.append(key)
        assert cands[0] == "dense"  # the default, used untimed inside a CUDA-graph capture
        return path
    monkeypatch.setattr(kernels._tune, "choose", pick)
    w, bias = two_four_weight(), torch.randn(64)
    layer = S.SemiStructuredLinear(w, bias, dense=w)
    x = torch.randn(2, 5, 128)
    expected = torch.nn.functional.linear(x, w if path == "dense" else torch.zeros_like(w), bias)
    torch.testing.assert_close(layer(x), expected)
    layer(torch.randn(3, 128))
    assert [k[3:] for k in keys] == [(64, 128, 16), (64, 128, 4)]
    assert torch.equal(S.SemiStructuredLinear(w, bias)(x), torch.nn.functional.linear(x, 0 * w, bias))

@pytest.mark.skipif(not ON_GPU, reason="semi-structured sparse kernels need a CUDA GPU of sm_80 or newer")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37, 256])
def test_semi_structured_linear_matches_the_dense_product(dtype, tokens):
    w = two_four_weight(256, 512, dtype, "cuda")
    bias = torch.randn(256, device="cuda", dtype=dtype)
    x = torch.randn(2, tokens, 512, device="cuda", dtype=dtype)
    ref = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    out = S.SemiStructuredLinear(w, bias)(x)
    assert out.shape == ref.shape and out.dtype == dtype
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (2e-3 if dtype == torch.float16 else 1.2e-2), err


@pytest.mark.skipif(not ON_GPU, reason="semi-structured sparse kernels need a CUDA GPU of sm_80 or newer")
def test_a_pruned_model_runs_on_sparse_tensor_cores_and_matches_dense():
    """The runtime option end to end on a GPU: every 2:4 layer (shapes of 128/256/512) swapped, logits
    as with the dense masked weights, the MaskedLinear layers back afterwards."""
    torch.manual_seed(0)
    model = pruned_llama(hidden=256, intermediate=512, heads=4, kv_heads=2).half().cuda()
    ids = torch.randint(3, 250, (2, 64), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        with use_runtime(model, {"semi_structured": True}):
            assert sum(isinstance(m, S.SemiStructuredLinear) for m in model.modules()) == 14
            out = model(input_ids=ids).logits.float()
    assert len(S.two_four_layers(model)) == 14
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
