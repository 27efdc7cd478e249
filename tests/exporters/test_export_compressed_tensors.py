"""format: compressed-tensors, checked with the compressed-tensors package itself (and transformers)."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import llama, logits, rtn, token_ids

from effopt.exporters.compressed_tensors import export_compressed_tensors, int32_words
from effopt.nn.quant_linear import QuantLinear

ct = pytest.importorskip("compressed_tensors", reason="the compressed-tensors package verifies this format")

LAYOUTS = [(4, 32, True), (4, 32, False), (4, -1, False), (8, -1, True), (8, 32, False)]


def _export(tmp_path, tokenizer, bits, group, sym):
    model = rtn(llama(), bits, group, sym)
    export_compressed_tensors(model, tokenizer, tmp_path / "ct", {"history": []})
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    return model, config


def _layer_tensors(folder, name):
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    return {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}


@pytest.mark.parametrize("bits, group, sym", LAYOUTS)
def test_compressed_tensors_decompresses_to_effopt_weights(tmp_path, tokenizer, bits, group, sym):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, config = _export(tmp_path, tokenizer, bits, group, sym)
    qconfig = QuantizationConfig.model_validate(config)
    assert qconfig.format == "pack-quantized" and qconfig.ignore == ["lm_head"]
    scheme = qconfig.config_groups["group_0"]
    assert scheme.targets == ["Linear"] and scheme.weights.num_bits == bits and scheme.weights.symmetric == sym
    assert scheme.weights.strategy == ("channel" if group == -1 else "group")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        tensors = _layer_tensors(tmp_path / "ct", name)
        assert ("weight_zero_point" in tensors) == (not sym)
        weight = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]
        torch.testing.assert_close(weight.float(), layer.dequantize(torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("bits, group, sym", LAYOUTS)
def test_packed_tensors_equal_what_compressed_tensors_writes(tmp_path, tokenizer, bits, group, sym):
    """compressed-tensors' own compressor, fed effopt's weights/scales/zero points, writes the same bytes."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, config = _export(tmp_path, tokenizer, bits, group, sym)
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        layer, ours = model.get_submodule(name), _layer_tensors(tmp_path / "ct", name)
        state = {"weight": layer.dequantize(torch.float32), "weight_scale": layer.scales}
        if not sym:
            state["weight_zero_point"] = (layer.zeros - 2 ** (bits - 1)).to(torch.int8)
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        assert sorted(theirs) == sorted(ours)
        for key in theirs:
            assert torch.equal(theirs[key], ours[key]), key


@pytest.mark.usefixtures("exact_quant_path")  # atol 1e-5 vs the dequantized path, not the bf16 CPU ops
@pytest.mark.parametrize("bits, group", [(4, 32), (8, -1)])
def test_transformers_loads_symmetric_export_with_same_logits(tmp_path, tokenizer, bits, group):
    """transformers' compressed-tensors integration decompresses on CPU. Asymmetric checkpoints are not
    tried: with compressed-tensors 0.20 transformers allocates unpacked zero points and refuses the
    packed ones the format (and vLLM) use (llm-compressor issue #1618)."""
    from transformers import AutoModelForCausalLM

    model, _ = _export(tmp_path, tokenizer, bits, group, True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = token_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_manifest_records_layers_schemes_and_no_sparsity(tmp_path, tokenizer):
    _export(tmp_path, tokenizer, 4, 32, True)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    fmt = json.loads((tmp_path / "ct" / "effopt_manifest.json").read_text())["format"]
    assert fmt["name"] == "compressed-tensors" and fmt["layout"] == "pack-quantized"
    assert len(fmt["quantized_layers"]) == 14 and fmt["float_layers"] == ["lm_head"]
    assert fmt["quantized_layers"]["model.layers.0.mlp.up_proj"] == {"num_bits": 4, "symmetric": True,
                                                                      "strategy": "group", "group_size": 32}
    assert fmt["sparsity"] is None and "sparsity_config" not in config["quantization_config"]
    assert fmt["vllm_fusion_problems"] == []


def test_two_four_sparsity_is_recorded(tmp_path, tokenizer):
    from compressed_tensors.config import SparsityCompressionConfig

    from effopt.nn.masked_linear import apply_mask
    from effopt.stages.base import DEFAULT_TARGETS
    from effopt.stages.quantize import select_linears

    model = llama()
    for name, linear in select_linears(model, DEFAULT_TARGETS, ["lm_head"]):
        w = linear.weight.detach().abs().reshape(linear.out_features, -1, 4)
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.topk(2, dim=-1).indices, True)
        apply_mask(model, name, keep.reshape(linear.weight.shape), "2:4")
    rtn(model, 4, 32, False)
    export_compressed_tensors(model, tokenizer, tmp_path / "ct", {"history": [{"stage": "prune"}]})
    sparsity = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4" and sparsity["global_sparsity"] >= 0.5
    parsed = SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity)
    assert parsed.sparsity_structure == "2:4" and len(parsed.targets) == 14


@pytest.mark.parametrize("bits, group, targets, error", [
    (3, 32, None, "3-bit"),
    (4, 48, None, "does not divide"),
    (4, 32, ["*.q_proj"], None),
])
def test_unrepresentable_layouts_are_refused(tmp_path, tokenizer, bits, group, targets, error):
    model = rtn(llama(), bits, group, True, targets)
    if error is None:  # a partly quantized model is fine: the rest is listed in `ignore`
        export_compressed_tensors(model, tokenizer, tmp_path / "ct", {})
        config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
        assert len(config["ignore"]) == 13 and config["config_groups"]["group_0"]["targets"] == ["Linear"]
        return
    with pytest.raises(ValueError, match=error):
        export_compressed_tensors(model, tokenizer, tmp_path / "ct", {})


def test_float_model_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs quantized layers"):
        export_compressed_tensors(llama(), tokenizer, tmp_path / "ct", {})


@pytest.mark.parametrize("data, words", [
    ([[0x01, 0x02, 0x03, 0x04]], [[0x04030201]]),
    ([[0xFF, 0xFF, 0xFF, 0xFF, 0x07]], [[-1, 7]]),
    ([[0x00, 0x00, 0x00, 0x80]], [[-(2**31)]]),
])
def test_int32_words_is_little_endian_twos_complement(data, words):
    out = int32_words(torch.tensor(data, dtype=torch.uint8))
    assert out.dtype == torch.int32 and out.tolist() == words


@pytest.mark.usefixtures("exact_quant_path")  # atol 1e-5 vs the dequantized path, not the bf16 CPU ops
def test_lora_over_packed_layers_is_merged_into_float_layers(tmp_path, tokenizer):
    """Packed codes cannot hold a LoRA update: such layers are written merged, in float, and ignored."""
    from transformers import AutoModelForCausalLM

    from effopt.nn import set_submodule
    from effopt.nn.adapters import LoraQuantLinear

    model = rtn(llama(), 4, 32, True)
    name = "model.layers.0.self_attn.q_proj"
    base = model.get_submodule(name)
    lora = LoraQuantLinear.from_base(base, torch.randn(4, base.in_features) * 0.1,
                                      torch.randn(base.out_features, 4) * 0.1, alpha=8.0)
    set_submodule(model, name, lora)
    export_compressed_tensors(model, tokenizer, tmp_path / "ct", {})
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == sorted(["lm_head", name])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = token_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)
