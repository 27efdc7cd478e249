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


def _lora_over_packed():
    """What finetune lora/qlora leaves over a quantized base: LoraQuantLinear layers."""
    from effopt.nn import set_submodule
    from effopt.nn.adapters import LoraQuantLinear

    model = rtn(llama(), 4, 32, True)
    gen = torch.Generator().manual_seed(1)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        base = model.get_submodule(name)
        a = torch.randn(4, base.in_features, generator=gen) * 0.1
        b = torch.randn(base.out_features, 4, generator=gen) * 0.1
        set_submodule(model, name, LoraQuantLinear.from_quant(base, a, b, alpha=8.0))
    return model


def _reload_with_peft(folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder / "base").eval()
    return PeftModel.from_pretrained(base, folder / "adapter").eval()


@pytest.mark.parametrize("make", [_peft_model, _lora_over_packed], ids=["peft-model", "lora-over-packed"])
def test_peft_export_reloads_with_peft_to_the_same_logits(tmp_path, tokenizer, make):
    model = make()
    ids = token_ids()
    want = logits(model, ids)
    metrics = export_peft(model, tokenizer, tmp_path / "p", {"history": []})
    torch.testing.assert_close(logits(_reload_with_peft(tmp_path / "p"), ids), want, rtol=0, atol=1e-5)
    fmt = json.loads((tmp_path / "p" / "effopt_manifest.json").read_text())["format"]
    assert fmt["name"] == "peft" and fmt["base"] == "base" and fmt["adapter"] == "adapter"
    assert fmt["adapters"]["default"]["peft_type"] == "LORA"
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


def test_packed_base_and_effopt_adapter_loader_rebuild_lora_over_codes(tmp_path, tokenizer):
    from effopt.methods.peft.adapter_io import load_adapter
    from effopt.models import load_model
    from effopt.nn.adapters import LoraQuantLinear
    from effopt.nn.quant_linear import QuantLinear

    model = _lora_over_packed()
    export_peft(model, tokenizer, tmp_path / "p", {}, packed=True)
    base, _, _ = load_model(str(tmp_path / "p" / "base"), device="cpu")
    assert type(base.model.layers[0].self_attn.q_proj) is QuantLinear
    assert load_adapter(base, tmp_path / "p" / "adapter") == 2
    assert isinstance(base.model.layers[0].self_attn.q_proj, LoraQuantLinear)
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
