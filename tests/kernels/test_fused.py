"""kernels.fused against their torch references (interpreter on CPU, real sizes on a GPU)."""
import pytest
import torch

from kernel_testing import DEVICE, ON_GPU, rel_err  # noqa: F401  (sets TRITON_INTERPRET first)
from kernels import fused

DTYPES = [torch.bfloat16, torch.float16]


def tiny_llama():
    """A random 2-layer Llama with GQA (built here: `conftest` can name another directory's module)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (3, 100)])
def test_add_rms_norm_matches_reference(dtype, with_delta, rows, hidden):
    x = torch.randn(rows, 1, hidden, device=DEVICE).to(dtype)
    delta = torch.randn_like(x) if with_delta else None
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    total, y = fused.add_rms_norm(x, w, 1e-5, delta)
    ref_total, ref_y = fused.add_rms_norm_reference(x, w, 1e-5, delta)
    if ON_GPU or dtype == torch.float16:
        assert torch.equal(total, ref_total)  # the residual stream is bit-identical to a torch add
    else:  # the interpreter truncates fp32 -> bf16 instead of rounding to nearest: at most one ulp off
        assert ((total.float() - ref_total.float()).abs() <= ref_total.float().abs() * 2**-7).all()
    assert rel_err(y, ref_y) < 1e-2
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,h,d", [(1, 1, 3, 64), (2, 3, 5, 16)])
def test_rope_matches_reference(dtype, b, t, h, d):
    x = torch.randn(b, t, h, d, device=DEVICE).to(dtype)
    ang = torch.rand(b, t, d // 2, device=DEVICE) * 6
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
    sin = torch.cat((-ang.sin(), ang.sin()), -1).to(dtype)
    y = fused.rope(x, cos, sin)
    assert rel_err(y, fused.rope_reference(x.float(), cos.float(), sin.float())) < 1e-2


def test_rope_reads_a_strided_view():
    fused_out = torch.randn(2, 3, 7 * 16, device=DEVICE).to(torch.float16)  # q (4 heads), k (1), v (2)
    qk = fused_out[..., : 5 * 16].reshape(2, 3, 5, 16)
    assert not qk.is_contiguous()
    ang = torch.rand(2, 3, 8, device=DEVICE) * 6
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((-ang.sin(), ang.sin()), -1)
    y = fused.rope(qk, cos.half(), sin.half())
    assert rel_err(y, fused.rope_reference(qk.float(), cos.half().float(), sin.half().float())) < 1e-2


def test_rope_rejects_bad_shapes():
    x = torch.randn(1, 1, 2, 6, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two"):
        fused.rope(x, torch.ones(1, 1, 6, device=DEVICE), torch.ones(1, 1, 6, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,f", [(1, 1536), (3, 40)])
def test_silu_mul_matches_reference(dtype, rows, f):
    gu = torch.randn(rows, 1, 2 * f, device=DEVICE).to(dtype)
    y = fused.silu_mul(gu)
    assert y.shape == (rows, 1, f)
    assert rel_err(y, fused.silu_mul_reference(gu.float())) < 1e-2


@pytest.mark.parametrize("fuse", [True, False])
def test_decoder_step_with_fused_kernels_matches_torch_path(fuse):
    """The Decoder's fused-kernel forward (residual adds folded into the norms, one-launch RoPE and
    SiLU-mul) gives the torch path's logits, prefill and a decode step, in fp16."""
    from effopt.generation.decoder import Decoder

    model = tiny_llama().to(DEVICE).half()
    logits = {}
    for use in (False, True):
        dec = Decoder(model)
        if fuse:
            dec.fuse()
        dec.kernels = fused if use else None
        cache = dec.new_cache("bf16", 1, 16)
        ids = torch.tensor([[5, 9, 11, 3, 7]], device=DEVICE)
        pre = dec.forward(ids, torch.tensor([0], device=DEVICE), cache, kv_len=5)
        step = dec.forward(torch.tensor([[4]], device=DEVICE), torch.tensor([5], device=DEVICE), cache, kv_len=6)
        logits[use] = torch.cat((pre[0], step[0])).float()
    assert rel_err(logits[True], logits[False]) < 1e-2
    assert (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_decoder_fused_kernels_batch_rows_at_different_positions(kind, monkeypatch):
    """Two rows prefilled one at a time into a batch-2 cache (row views), then one decode step for both
    at different positions: the fused path writes each row's K/V at its own slot (int8: the codes and
    scales the torch path's quantize_kv would store)."""
    from effopt.generation.decode import prefill
    from effopt.generation.decoder import Decoder
    from effopt.nn import kv_cache

    monkeypatch.setattr(kv_cache, "FUSED_INT8_STORE", True)  # whatever the environment says
    stores = []  # the caches each fused store wrote: the fused path must be the one taken
    store = fused.rope_store_kv
    monkeypatch.setattr(fused, "rope_store_kv", lambda *a, **kw: stores.append(kw["k_cache"].dtype) or store(*a, **kw))
    model = tiny_llama().to(DEVICE).half()
    prompts = [[5, 9, 11, 3, 7], [8, 2, 6]]
    logits = {}
    for use in (False, True):
        dec = Decoder(model).fuse()
        dec.kernels = fused if use else None
        cache = dec.new_cache(kind, 2, 16)
        for row, p in enumerate(prompts):
            prefill(dec, cache, p, row)
        start = torch.tensor([len(p) for p in prompts], device=DEVICE)
        logits[use] = dec.forward(torch.tensor([[4], [1]], device=DEVICE), start, cache)[:, 0].float()
    assert rel_err(logits[True], logits[False]) < 1e-2
    assert len(stores) == 3 * 2 and set(stores) == {torch.int8 if kind == "int8" else torch.float16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t", [(1, 1), (2, 3)])
def test_rope_store_kv_int8_writes_the_codes_quantize_kv_gives(b, t, dtype):
    """int8 caches: k rotated then rounded to the model dtype, v as is, each quantized exactly as
    kernels.attention.quantize_kv does (same codes, same scales), V written [D, L]."""
    from kernels.attention import quantize_kv

    nh, nkv, d, L = 4, 2, 16, 10
    qkv = (torch.randn(b, t, (nh + 2 * nkv) * d, device=DEVICE) * 3).to(dtype).view(b, t, nh + 2 * nkv, d)
    ang = torch.rand(b, t, d // 2, device=DEVICE) * 6
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
    sin = torch.cat((-ang.sin(), ang.sin()), -1).to(dtype)
    pos = torch.tensor([[5, 2, 7][:t], [0, 9, 1][:t]][:b], device=DEVICE)
    kc = torch.full((b, nkv, L, d), 99, device=DEVICE, dtype=torch.int8)
    vc = torch.full((b, nkv, d, L), 99, device=DEVICE, dtype=torch.int8).transpose(2, 3)
    ks, vs = (torch.full((b, nkv, L), float("nan"), device=DEVICE) for _ in range(2))
    q = fused.rope_store_kv(qkv, cos, sin, pos, kc, vc, nh, ks, vs)
    plain = torch.full((b, nkv, L, d), float("nan"), device=DEVICE, dtype=dtype)
    k_plain, v_plain = plain.clone(), plain.clone()
    q_plain = fused.rope_store_kv(qkv, cos, sin, pos, k_plain, v_plain, nh)  # the float path: same rotation
    assert torch.equal(q, q_plain)
    for bi in range(b):
        for ti in range(t):
            slot = int(pos[bi, ti])
            for codes, scale, ref in ((kc, ks, k_plain), (vc, vs, v_plain)):
                want_codes, want_scale = quantize_kv(ref[bi, :, slot])
                assert torch.equal(codes[bi, :, slot], want_codes)
                torch.testing.assert_close(scale[bi, :, slot], want_scale, rtol=0, atol=0)
    for bi in range(b):  # every other slot untouched
        others = [s for s in range(L) if s not in pos[bi].tolist()]
        assert (kc[bi, :, others] == 99).all() and (vc[bi, :, others] == 99).all()
        assert ks[bi, :, others].isnan().all() and vs[bi, :, others].isnan().all()


@pytest.mark.parametrize("b,t", [(1, 1), (2, 3)])
def test_rope_store_kv_rotates_q_and_writes_the_cache(b, t):
    nh, nkv, d, L = 4, 2, 16, 10
    qkv = torch.randn(b, t, (nh + 2 * nkv) * d, device=DEVICE).half().view(b, t, nh + 2 * nkv, d)
    ang = torch.rand(b, t, d // 2, device=DEVICE) * 6
    cos = torch.cat((ang.cos(), ang.cos()), -1).half()
    sin = torch.cat((-ang.sin(), ang.sin()), -1).half()
    pos = torch.tensor([[5, 2, 7][:t], [0, 9, 1][:t]][:b], device=DEVICE)
    kc = torch.full((b, nkv, L, d), float("nan"), device=DEVICE).half()
    vc = torch.full_like(kc, float("nan"))
    q = fused.rope_store_kv(qkv, cos, sin, pos, kc, vc, nh)
    ref = fused.rope_reference(qkv.float(), cos.float(), sin.float())
    assert rel_err(q, ref[:, :, :nh]) < 1e-2
    for bi in range(b):
        for ti in range(t):
            slot = int(pos[bi, ti])
            assert rel_err(kc[bi, :, slot], ref[bi, ti, nh:nh + nkv]) < 1e-2
            assert torch.equal(vc[bi, :, slot], qkv[bi, ti, nh + nkv:])
    written = torch.zeros(b, L, dtype=torch.bool)
    for bi in range(b):
        written[bi, pos[bi].cpu()] = True
    assert torch.isnan(kc.float()).any(-1).all(1).cpu().eq(~written).all()  # nothing else was touched
