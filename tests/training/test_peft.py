"""LoRA / QLoRA / LoftQ / adapters / prompt and prefix tuning on tiny in-code Llamas: start-up
invariance, what trains, masks and quantized bases surviving, finalize == trained function,
checkpoints and adapter folders loading back."""

from __future__ import annotations

import pytest
import torch

from effopt.methods.peft.lora import add_lora, finalize_lora, select_targets
from effopt.methods.quant.rtn import quantize_weight
from effopt.nn import set_submodule
from effopt.nn.adapters import AdapterLinear, LoraBnb4bitLinear, LoraQuantLinear
from effopt.nn.masked_linear import MaskedLinear, apply_mask
from effopt.nn.quant_linear import QuantLinear
from effopt.training.loop import train
from effopt.training.options import TrainOptions
from effopt.training.tasks import CausalLMTask
from tests.conftest import tiny_llama

OPTS = TrainOptions(steps=3, batch_size=2, seq_len=16, lr=1e-2, schedule="constant", log_every=100)
IDS = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(1))
BATCHES = {"input_ids": torch.randint(3, 259, (6, 16), generator=torch.Generator().manual_seed(2))}


def mixed_model(quantized: str = "int"):
    """Tiny Llama with a masked (50%), a 4-bit (effopt packed, or bitsandbytes NF4) and dense layers."""
    from effopt.nn.bnb_linear import Bnb4bitLinear

    model = tiny_llama()
    w = model.model.layers[0].mlp.down_proj.weight
    apply_mask(model, "model.layers.0.mlp.down_proj", torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    q = model.model.layers[1].self_attn.q_proj
    if quantized == "nf4":
        layer = Bnb4bitLinear.from_linear(q, q.weight.detach(), "nf4", double_quant=True)
    else:
        codes, scales, zeros = quantize_weight(q.weight.detach(), 4, 32)
        layer = QuantLinear.from_codes(codes, scales, zeros, 4, 32, None, False, torch.float32)
    set_submodule(model, "model.layers.1.self_attn.q_proj", layer)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_b_starts_at_zero_so_the_output_is_unchanged():
    model = mixed_model()
    ref = logits(model)
    add_lora(model, select_targets(model, ["*proj"], []), r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(p) == 0
    torch.testing.assert_close(logits(model), ref, atol=0, rtol=0)


def test_lora_trains_only_lora_and_finalize_keeps_the_function_masks_and_quantization():
    model = mixed_model()
    names = select_targets(model, ["*proj"], [])
    add_lora(model, names, r=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    train(CausalLMTask(model), BATCHES, OPTS)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    trained = logits(model)
    counts = finalize_lora(model)
    assert counts == {"merged": len(names) - 1, "kept_on_quantized": 1}
    torch.testing.assert_close(logits(model), trained, atol=2e-5, rtol=1e-5)
    masked = model.model.layers[0].mlp.down_proj
    assert type(masked) is MaskedLinear and torch.count_nonzero(masked.weight[~masked.weight_mask]) == 0
    assert type(model.model.layers[1].self_attn.q_proj) is LoraQuantLinear
    assert not any(p.requires_grad for p in model.parameters())


def test_lora_over_masked_layer_keeps_pruned_weights_zero_while_training():
    model = mixed_model()
    add_lora(model, ["model.layers.0.mlp.down_proj"], r=4)
    layer = model.model.layers[0].mlp.down_proj
    train(CausalLMTask(model), BATCHES, OPTS)
    x = torch.randn(3, layer.in_features)
    mask = layer.get_base_layer().weight_mask
    # the layer's effective weight, read off its outputs on unit inputs, is zero where pruned
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        effective = (layer(eye) - layer(torch.zeros_like(eye))).T
    assert torch.count_nonzero(effective[~mask]) == 0 and torch.count_nonzero(layer.lora_B["default"].weight) > 0
    assert layer(x).shape == (3, layer.out_features)


@pytest.mark.parametrize("quantized,kind", [("int", LoraQuantLinear), ("nf4", LoraBnb4bitLinear)])
def test_lora_over_quantized_checkpoints_and_adapter_folder_load_back(tmp_path, quantized, kind):
    from peft import PeftModel

    from effopt.methods.peft import load_adapter, save_adapter
    from effopt.models import load_checkpoint, save_checkpoint
    from effopt.stages.export import densify

    model = mixed_model(quantized)
    add_lora(model, ["model.layers.1.self_attn.q_proj"], r=4)
    train(CausalLMTask(model), BATCHES, OPTS)
    finalize_lora(model)
    layer = model.model.layers[1].self_attn.q_proj
    assert type(layer) is kind
    x = torch.randn(3, layer.in_features)
    base_only = layer.to_base()  # what an export writes beside the adapter folder
    assert type(base_only) is kind.__mro__[2]
    torch.testing.assert_close(base_only(x) + layer.lora_term(x), layer(x), atol=1e-6, rtol=1e-6)
    want = logits(model)
    save_checkpoint(model, None, tmp_path / "ckpt", {})
    back, _ = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(logits(back), want, atol=0, rtol=0)
    save_adapter(model, tmp_path / "adapter")
    base = mixed_model(quantized)  # the same quantized base, no adapter
    assert load_adapter(base, tmp_path / "adapter") == 1
    assert type(base.model.layers[1].self_attn.q_proj) is kind
    torch.testing.assert_close(logits(base), want, atol=1e-5, rtol=1e-5)
    dense = densify(mixed_model(quantized))  # a plain transformers model: peft loads the folder onto it
    peft_model = PeftModel.from_pretrained(dense, str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(peft_model), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("base,bits,group", [("int", 4, 32), ("int", 3, 32), ("int", 2, 32), ("nf4", 4, 64)])
def test_loftq_beats_plain_quantization_and_does_not_worsen_with_iterations(base, bits, group):
    from effopt.methods.peft.loftq import loftq, nf4_quantizer, rtn_quantizer

    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    quantize = nf4_quantizer() if base == "nf4" else rtn_quantizer(bits, group, False)
    plain = (w - quantize(w)[1]).norm()
    errors = []
    for iters in (1, 4):
        _, deq, left, right = loftq(w, quantize, rank=8, iters=iters)
        errors.append((w - deq - left @ right).norm())
    assert errors[0] < 0.95 * plain, (errors, plain)
    assert errors[1] <= errors[0] * 1.02, errors


@pytest.mark.parametrize("base", ["nf4", "int"])
def test_qlora_quantizes_dense_bases_and_finalizes_to_the_trained_function(base):
    from effopt.methods.peft.qlora import add_qlora

    model = tiny_llama()
    names = select_targets(model, ["*.q_proj", "*.down_proj"], [])
    add_qlora(model, names, base=base, r=4, group_size=32, loftq_iters=1)
    train(CausalLMTask(model), BATCHES, OPTS)
    trained = logits(model)
    finalize_lora(model)
    torch.testing.assert_close(logits(model), trained, atol=1e-5, rtol=1e-5)
    kind = LoraQuantLinear if base == "int" else LoraBnb4bitLinear
    assert all(type(model.get_submodule(n)) is kind for n in names)


def test_qlora_existing_base_refuses_dense_layers():
    from effopt.methods.peft.qlora import add_qlora

    model = tiny_llama()
    with pytest.raises(ValueError, match="not quantized"):
        add_qlora(model, select_targets(model, ["*q_proj"], []), base="existing")


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_adapters_start_as_identity_train_alone_and_checkpoint(tmp_path, placement):
    from effopt.methods.peft.adapters import add_adapters
    from effopt.models import load_checkpoint, save_checkpoint

    model = mixed_model()
    ref = logits(model)
    names = select_targets(model, ["*.o_proj", "*.down_proj"], [])
    add_adapters(model, names, bottleneck=8, placement=placement)
    torch.testing.assert_close(logits(model), ref, atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".down." in n or ".up." in n for n in trainable)
    train(CausalLMTask(model), BATCHES, OPTS)
    assert not torch.equal(logits(model), ref)
    masked = model.model.layers[0].mlp.down_proj
    assert isinstance(masked, AdapterLinear) and type(masked.base) is MaskedLinear
    save_checkpoint(model, None, tmp_path / "ckpt", {})
    back, _ = load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(logits(back), logits(model), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_prompt_and_prefix_tuning_train_only_their_parameters(kind):
    from effopt.methods.peft.prompt import add_prompt_learning, adapter_perplexity

    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = add_prompt_learning(model, kind, num_virtual_tokens=4)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    train(CausalLMTask(peft_model), BATCHES, OPTS)
    assert all(not torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if p.requires_grad)
    for k, v in peft_model.get_base_model().state_dict().items():
        assert torch.equal(v, base_state[k]), k
    out = adapter_perplexity(peft_model, [BATCHES["input_ids"][0]])
    assert out["eval_tokens"] == 15 and out["perplexity"] > 1


def test_full_finetuning_trains_everything_but_packed_and_frozen_names():
    from effopt.methods.peft.adapters import mark_trainable

    model = mixed_model()
    count = mark_trainable(model, ["*embed_tokens*"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("embed_tokens" in n for n in names) and "model.norm.weight" in names
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    train(CausalLMTask(model), BATCHES, OPTS)
    masked = model.model.layers[0].mlp.down_proj
    assert torch.count_nonzero(masked.weight[~masked.weight_mask]) == 0
