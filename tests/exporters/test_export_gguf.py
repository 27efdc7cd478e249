"""format: gguf, read back by transformers' GGUF reader (and by llama.cpp when llama-cpp-cffi is installed).

Tolerances are relative L2 errors (||got - want|| / ||want||) on a random Llama (hidden 256 so that
Q4_K's 256-wide super-blocks fit): random Gaussian weights are the hardest case for 4-bit formats.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export_helpers import bpe_tokenizer, llama, logits, rel_err, rtn, token_ids

from effopt.exporters.gguf import export_gguf, permute_rows
from effopt.exporters.gguf_quants import q4_k_quantize

# format: (max relative error of logits vs the source, of each weight vs the source)
TOLERANCE = {"F16": (2e-3, 1e-3), "Q8_0": (3e-2, 1e-2), "Q4_0": (0.35, 0.15), "Q4_1": (0.35, 0.15),
             "Q4_K": (0.35, 0.15)}


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer()


def _big(bpe, **kw):
    return llama(hidden=256, intermediate=512, vocab=len(bpe), **kw)


def _load(folder, gguf_type):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"model-{gguf_type}.gguf",
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("gguf_type", list(TOLERANCE))
def test_transformers_reads_gguf_with_logits_close_to_source(tmp_path, bpe, gguf_type):
    model = _big(bpe)
    export_gguf(model, bpe, tmp_path / "g", {}, gguf_type)
    loaded = _load(tmp_path / "g", gguf_type)
    ids = token_ids(32, len(bpe))
    logit_tol, weight_tol = TOLERANCE[gguf_type]
    assert rel_err(logits(loaded, ids), logits(model, ids)) <= logit_tol
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        assert rel_err(loaded.get_submodule(name).weight, model.get_submodule(name).weight) <= weight_tol, name
    fmt = json.loads((tmp_path / "g" / "effopt_manifest.json").read_text())["format"]
    assert fmt["gguf_type"] == gguf_type and fmt["tensor_types"].get("F32") == 5  # 4 layer norms + final norm
    assert fmt["tensors"]["blk.0.attn_q.weight"]["type"] == gguf_type and fmt["tokenizer"]["merges"] > 0
    # 4-bit files keep the output layer (here the tied embedding) at 8 bits, as llama.cpp does
    assert fmt["tensors"]["token_embd.weight"]["type"] == ("Q8_0" if gguf_type.startswith("Q4") else gguf_type)


def test_f16_gguf_holds_exactly_the_fp16_weights(tmp_path, bpe):
    model = _big(bpe)
    export_gguf(model, bpe, tmp_path / "g", {}, "F16")
    loaded = _load(tmp_path / "g", "F16")
    for name, param in model.named_parameters():
        torch.testing.assert_close(loaded.get_parameter(name), param.detach().half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("bits, sym, gguf_type", [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0")])
def test_effopt_codes_are_written_as_they_are(tmp_path, bpe, bits, sym, gguf_type):
    """A layer quantized by effopt in the block's own layout keeps its codes (only scales go to fp16)."""
    model = rtn(_big(bpe), bits, 32, sym)
    export_gguf(model, bpe, tmp_path / "g", {}, gguf_type)
    fmt = json.loads((tmp_path / "g" / "effopt_manifest.json").read_text())["format"]
    assert len(fmt["transferred"]) == 14 and "token_embd.weight" not in fmt["transferred"]
    loaded = _load(tmp_path / "g", gguf_type)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):
        want = model.get_submodule(name).dequantize(torch.float32)
        assert rel_err(loaded.get_submodule(name).weight, want) <= 1e-3, name


def test_layout_mismatch_is_requantized_not_transferred(tmp_path, bpe):
    model = rtn(_big(bpe), 4, 32, False)  # asymmetric codes cannot go into Q4_0 as they are
    export_gguf(model, bpe, tmp_path / "g", {}, "Q4_0")
    fmt = json.loads((tmp_path / "g" / "effopt_manifest.json").read_text())["format"]
    assert fmt["transferred"] == [] and fmt["tensors"]["blk.0.attn_q.weight"]["how"] == "quantized"


def test_q4_k_falls_back_to_q4_0_on_narrow_rows(tmp_path, tokenizer):
    export_gguf(llama(), tokenizer, tmp_path / "g", {}, "Q4_K")  # hidden 64: no 256-wide super-block fits
    fmt = json.loads((tmp_path / "g" / "effopt_manifest.json").read_text())["format"]
    assert fmt["tensor_types"] == {"F32": 5, "Q4_0": 14, "Q8_0": 1}  # the tied embedding is the output layer
    assert "warning" in fmt["tokenizer"]  # the byte tokenizer has no merges: recorded, not hidden


def test_gguf_tokenizer_encodes_like_the_source(tmp_path, bpe):
    from transformers import AutoTokenizer

    export_gguf(_big(bpe), bpe, tmp_path / "g", {}, "Q8_0")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="model-Q8_0.gguf")
    text = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home."
    assert loaded(text)["input_ids"] == bpe(text)["input_ids"]


@pytest.mark.parametrize("seed", [0, 1])
def test_q4_k_encoder_round_trips_through_gguf_dequantizer(seed):
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(seed).standard_normal((4, 512)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero sub-block must survive
    got = quants.dequantize(q4_k_quantize(w), GGMLQuantizationType.Q4_K)
    assert got.shape == w.shape and np.all(got[0, :32] == 0)
    assert np.linalg.norm(got - w) / np.linalg.norm(w) <= 0.1  # 4-bit asymmetric, sub-blocks of 32
    q4_1 = quants.dequantize(quants.quantize(w, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    assert np.linalg.norm(got - w) <= 1.1 * np.linalg.norm(q4_1 - w)  # as good as the same-size legacy block


def test_permute_rows_matches_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    back = LlamaTensorProcessor()._reverse_permute_weights(permute_rows(w, 2).numpy(), 2, 2)
    assert np.array_equal(back, w.numpy())


def test_non_llama_models_are_refused(tmp_path, tokenizer):
    model = llama()
    model.config.model_type = "gemma3_text"
    with pytest.raises(ValueError, match="llama architecture"):
        export_gguf(model, tokenizer, tmp_path / "g", {}, "F16")


LLAMA_CPP_TOLERANCE = {"F16": 1e-2, "Q8_0": 3e-2, "Q4_0": 0.1}  # vs transformers reading the same file


@pytest.mark.parametrize("gguf_type", list(LLAMA_CPP_TOLERANCE))
def test_llama_cpp_runs_the_gguf_like_transformers(tmp_path, bpe, gguf_type):
    """llama.cpp's own quantized dot products (activations in 8 bits for Q4_0/Q8_0) add a little error."""
    from llama_cpp_runner import llama_cpp_api, llama_cpp_logits

    try:
        llama_cpp_api()
    except ImportError as exc:
        pytest.skip(str(exc))
    model = _big(bpe)
    export_gguf(model, bpe, tmp_path / "g", {}, gguf_type)
    ids = token_ids(32, len(bpe))
    want = logits(_load(tmp_path / "g", gguf_type), ids)[0]
    got = torch.from_numpy(llama_cpp_logits(tmp_path / "g" / f"model-{gguf_type}.gguf", ids[0].tolist()))
    assert rel_err(got, want) <= LLAMA_CPP_TOLERANCE[gguf_type]
    # the two readers agree even on a file with a wrong rotary layout (each undoes it its own way): the source decides
    assert rel_err(got, logits(model, ids)[0]) <= TOLERANCE[gguf_type][0]
