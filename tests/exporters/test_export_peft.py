"""format: peft: base/ + adapter/ folders that peft (and effopt) load back into the same model."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import llama, logits, rtn, token_ids

from effopt.exporters.peft import export_peft


def _peft_model():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # random B: the adapter changes the output
    return get_peft_model(llama(), config).eval()


def _lora_over(kind: str):
    """What finetune lora/qlora leaves over a quantized base: LoRA layers over packed codes or NF4."""
    from effopt.nn import set_submodule
    from effopt.nn.adapters import LoraBnb4bitLinear, LoraQuantLinear
    from effopt.nn.bnb_linear import Bnb4bitLinear

    model = rtn(llama(), 4, 32, True) if kind == "packed" else llama()
    gen = torch.Generator().manual_seed(1)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        base = model.get_submodule(name)
        if kind == "nf4":
            base = Bnb4bitLinear.from_linear(base, base.weight, "nf4")
        a = torch.randn(4, base.in_features, generator=gen) * 0.1
        b = torch.randn(base.out_features, 4, generator=gen) * 0.1
        lora = (LoraQuantLinear if kind == "packed" else LoraBnb4bitLinear).from_base(base, a, b, alpha=8.0)
        set_submodule(model, name, lora)
    return model


def _lora_over_packed():
    return _lora_over("packed")


def _lora_over_nf4():
    return _lora_over("nf4")


def _reload_with_peft(folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder / "base").eval()
    return PeftModel.from_pretrained(base, folder / "adapter").eval()


@pytest.mark.usefixtures("exact_quant_path")  # atol 1e-5 vs the dequantized path, not the bf16 CPU ops
@pytest.mark.parametrize("make", [_peft_model, _lora_over_packed, _lora_over_nf4],
                         ids=["peft-model", "lora-over-packed", "lora-over-nf4"])
def test_peft_export_reloads_with_peft_to_the_same_logits(tmp_path, tokenizer, make):
    model = make()
    ids = token_ids()
    want = logits(model, ids)
    metrics = export_peft(model, tokenizer, tmp_path / "p", {"history": []})
    torch.testing.assert_close(logits(_reload_with_peft(tmp_path / "p"), ids), want, rtol=0, atol=1e-4)
    fmt = json.loads((tmp_path / "p" / "effopt_manifest.json").read_text())["format"]
    assert fmt["name"] == "peft" and fmt["base"] == "base" and fmt["adapter"] == "adapter"
    assert fmt["adapters"]["default"]["peft_type"] == "LORA" and fmt["adapters"]["default"]["target_modules"]
    adapter_config = json.loads((tmp_path / "p" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "p" / "base").resolve())
    assert 0 < metrics["export_adapter_bytes"] < metrics["export_weights_bytes"]


def test_base_folder_is_the_model_without_adapters(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = _peft_model()
    export_peft(model, tokenizer, tmp_path / "p", {})
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "base").eval()
    ids = token_ids()
    with model.disable_adapter():
        torch.testing.assert_close(logits(base, ids), logits(model, ids), rtol=0, atol=1e-6)
    assert not torch.allclose(logits(base, ids), logits(model, ids), atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("make, base_type", [(_lora_over_packed, "QuantLinear"), (_lora_over_nf4, "Bnb4bitLinear")])
def test_packed_base_and_effopt_adapter_loader_rebuild_lora_over_quantized(tmp_path, tokenizer, make, base_type):
    from effopt.methods.peft.adapter_io import load_adapter
    from effopt.models import load_model
    from effopt.nn.adapters import LORA_TYPES

    model = make()
    export_peft(model, tokenizer, tmp_path / "p", {}, packed=True)
    base, _, _ = load_model(str(tmp_path / "p" / "base"), device="cpu")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == base_type
    assert load_adapter(base, tmp_path / "p" / "adapter") == 2
    assert isinstance(base.model.layers[0].self_attn.q_proj, LORA_TYPES)
    ids = token_ids()
    torch.testing.assert_close(logits(base, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_model_without_adapters_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs a model carrying adapters"):
        export_peft(llama(), tokenizer, tmp_path / "p", {})


def test_other_formats_merge_the_adapters(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from effopt.exporters.hf import export_hf
    from effopt.exporters.peft import merged_copy

    model = _peft_model()
    export_hf(merged_copy(model), tokenizer, tmp_path / "m", {})
    ids = token_ids()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)
