"""finetune: adapt the model on text (LoRA, QLoRA, adapters, prompt/prefix tuning, full, QAT).

Each method prepares the model (methods/peft, nn/fake_quant), the shared loop trains it
(effopt.training), and the method's finalizer leaves a plain model of effopt modules for the
runner's checkpoint: LoRA merged into dense and masked bases (masks re-applied), LoraQuantLinear /
LoraBnb4bitLinear over packed / NF4 bases (a peft adapter folder is written beside them), adapters as AdapterLinear, QAT converted to packed QuantLinear. Prompt and
prefix tuning leave the base unchanged and write a peft adapter folder (run_dir/adapters/NN-method).
`distributed: {nproc: N}` runs the training on N processes (see effopt.training.distributed).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from effopt.registry import register_stage
from effopt.stages.base import TargetedStageConfig
from effopt.training.options import TrainOptions

JOB = "effopt.stages.finetune:finetune_job"
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")


class FinetuneBase(TargetedStageConfig, TrainOptions):
    """Options every fine-tuning method shares (training options documented in TrainOptions)."""

    stage: Literal["finetune"] = "finetune"

    @model_validator(mode="after")
    def _check_codes(self):
        bits, group = getattr(self, "bits", 4), getattr(self, "group_size", 128)
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits: packed layouts exist for 2, 3, 4 and 8 bits, got {bits}")
        if group == 0 or group < -1:
            raise ValueError(f"group_size: expected a positive number of columns or -1, got {group}")
        return self


class LoraOptions(FinetuneBase):
    """LoRA factors shared by lora and qlora."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")


class LoraConfig(LoraOptions):
    """LoRA over every targeted layer: merged into dense / masked bases at the end, kept beside
    packed bases."""

    method: Literal["lora"] = "lora"
    init: Literal["default", "gaussian"] = Field("default", description="A's init (B starts at zero).")


class QLoraConfig(LoraOptions):
    """QLoRA: LoRA over a frozen quantized base, existing or quantized here (NF4 or packed int)."""

    method: Literal["qlora"] = "qlora"
    base: Literal["existing", "nf4", "int"] = Field(
        "existing", description="existing: the targets are already quantized (quantize stage); nf4: bitsandbytes "
                                "NF4 with double quantization (the QLoRA paper's base); int: effopt packed codes.")
    bits: int = Field(4, description="Bits of base: int (2, 3, 4 or 8).")
    group_size: int = Field(128, description="Group size of base: int (-1 = per channel).")
    symmetric: bool = Field(False, description="Symmetric codes for base: int.")
    init: Literal["default", "loftq"] = Field("default", description="loftq: choose base codes and LoRA factors "
                                                                     "together (Li et al. 2023).")
    loftq_iters: int = Field(1, ge=1, le=10, description="LoftQ alternating steps.")


class AdapterConfig(FinetuneBase):
    """Bottleneck adapters on the targeted layers' outputs (sequential) or beside them (parallel)."""

    method: Literal["adapter"] = "adapter"
    targets: list[str] = Field(default_factory=lambda: ["*.o_proj", "*.down_proj"],
                               description="Layers to attach adapters to (Houlsby: after attention and MLP).")
    bottleneck: int = Field(64, ge=1, description="Adapter width.")
    placement: Literal["sequential", "parallel"] = Field("sequential", description="On the layer's output, or "
                                                                                   "beside the layer.")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Nonlinearity.")
    scale: float = Field(1.0, gt=0, description="Factor on the adapter's output.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")


class PromptTuningConfig(FinetuneBase):
    """Prompt tuning (peft): trainable virtual-token embeddings prepended to every input."""

    method: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="Virtual tokens.")
    init: Literal["sample_vocab", "random"] = Field("sample_vocab", description="Start from embeddings of random "
                                                                                "vocabulary tokens, or random.")
    eval_data: str | None = Field("eval", description="Data source to score the model with its adapter on "
                                                      "(null = skip).")
    lr: float = Field(3e-2, gt=0, description="Peak learning rate.")


class PrefixTuningConfig(FinetuneBase):
    """Prefix tuning (peft): trainable per-layer key/value prefixes."""

    method: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="Prefix length.")
    projection: bool = Field(False, description="Reparameterise the prefix through an MLP (the paper's trick).")
    projection_hidden: int = Field(0, ge=0, description="MLP width (0 = hidden size).")
    eval_data: str | None = Field("eval", description="Data source to score the model with its adapter on "
                                                      "(null = skip).")
    lr: float = Field(1e-2, gt=0, description="Peak learning rate.")


class FullConfig(FinetuneBase):
    """Full fine-tuning of every floating-point weight (pruned weights stay zero; packed layers stay
    frozen; FakeQuantLinear layers train and are converted to packed integers at the end)."""

    method: Literal["full"] = "full"
    freeze: list[str] = Field(default_factory=list, description="Globs of parameter names to keep frozen.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")


class QatConfig(FinetuneBase):
    """Quantization-aware training: targeted layers compute with fake-quantized weights (STE), the
    model trains, and the layers are exported as packed integer QuantLinear."""

    method: Literal["qat"] = "qat"
    bits: int = Field(4, description="Bits per weight (2, 3, 4 or 8).")
    group_size: int = Field(128, description="Columns per group (-1 = per channel).")
    symmetric: bool = Field(False, description="Symmetric codes.")
    freeze: list[str] = Field(default_factory=lambda: ["*embed_tokens*", "lm_head*"],
                              description="Globs of parameter names to keep frozen.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")


# ----------------------------------------------------------------------------------------------
# prepare (make trainable) and finalize (back to plain effopt modules), per method


def _targets(cfg, model) -> list[str]:
    from effopt.methods.peft.lora import select_targets

    names = select_targets(model, cfg.targets, cfg.ignore)
    if not names:
        raise ValueError(f"finetune/{cfg.method}: targets {cfg.targets} matched no linear layer")
    return names


def _prepare(cfg, model):
    from effopt.methods.peft import adapters, lora, prompt, qlora
    from effopt.nn.fake_quant import insert_fake_quant

    if cfg.method == "lora":
        return lora.add_lora(model, _targets(cfg, model), cfg.r, cfg.alpha, cfg.dropout, cfg.init)
    if cfg.method == "qlora":
        return qlora.add_qlora(model, _targets(cfg, model), cfg.base, cfg.r, cfg.alpha, cfg.dropout, cfg.bits,
                               cfg.group_size, cfg.symmetric, cfg.loftq_iters if cfg.init == "loftq" else 0)
    if cfg.method == "adapter":
        return adapters.add_adapters(model, _targets(cfg, model), cfg.bottleneck, cfg.placement, cfg.activation,
                                     cfg.scale)
    if cfg.method == "prompt_tuning":
        return prompt.add_prompt_learning(model, "prompt_tuning", cfg.num_virtual_tokens, init=cfg.init)
    if cfg.method == "prefix_tuning":
        return prompt.add_prompt_learning(model, "prefix_tuning", cfg.num_virtual_tokens,
                                          prefix_projection=cfg.projection, projection_hidden=cfg.projection_hidden)
    if cfg.method == "qat":
        names = [n for n in _targets(cfg, model) if isinstance(model.get_submodule(n), torch.nn.Linear)]
        insert_fake_quant(model, names, cfg.bits, cfg.group_size, cfg.symmetric)
    adapters.mark_trainable(model, cfg.freeze)
    return model


def _finalize(cfg, model, env) -> tuple[torch.nn.Module, dict]:
    from effopt.methods.peft.lora import finalize_lora
    from effopt.nn.fake_quant import convert_fake_quant

    extra: dict = {}
    if cfg.method in ("lora", "qlora"):
        extra.update(finalize_lora(model))
    elif cfg.method in PROMPT_METHODS:
        if env.is_main and env.artifact_dir is not None:
            model.save_pretrained(str(env.artifact_dir))
        model = model.get_base_model()
    elif cfg.method in ("full", "qat"):
        extra["quantized_layers"] = convert_fake_quant(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, extra


def finetune_job(cfg, model, teacher, batches: dict, env) -> tuple[torch.nn.Module, dict]:
    """Prepare, train and finalize `model` (runs in each training process)."""
    from effopt.training.job import config_digest
    from effopt.training.loop import enable_gradient_checkpointing, train
    from effopt.training.tasks import CausalLMTask

    torch.manual_seed(env.seed)
    trainable = _prepare(cfg, model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(trainable)
    metrics = train(CausalLMTask(trainable), batches, cfg, env, config_digest(cfg))
    if cfg.gradient_checkpointing:
        trainable.gradient_checkpointing_disable()
        trainable.config.use_cache = True
    model, extra = _finalize(cfg, trainable, env)
    return model, {**metrics, **extra}


def apply_finetune(cfg, ctx) -> dict:
    """Train on ctx.data[cfg.data]; install the finalized model; record training metrics."""
    from effopt.methods.peft.adapter_io import adapter_factors, save_adapter
    from effopt.training.job import lm_batches, run_stage_job

    name = f"{ctx.stage_index:02d}-{cfg.method}"
    metrics = run_stage_job(JOB, cfg, ctx, None, lm_batches(ctx, cfg), name)
    folder = ctx.run_dir / "adapters" / name
    if cfg.method in PROMPT_METHODS:
        metrics["adapter_path"] = str(folder)
        if cfg.eval_data:
            metrics.update(_adapter_eval(ctx, folder, cfg.eval_data))
    elif cfg.method == "qlora" and adapter_factors(ctx.model):
        metrics["adapter_path"] = str(save_adapter(ctx.model, folder))
    return metrics


def _adapter_eval(ctx, folder, data: str) -> dict:
    from peft import PeftModel

    from effopt.methods.peft.prompt import adapter_perplexity

    peft_model = PeftModel.from_pretrained(ctx.model, str(folder))
    out = adapter_perplexity(peft_model, ctx.data.windows(data))
    ctx.model = peft_model.get_base_model()
    return {f"adapter_{k}": v for k, v in out.items()}


CONFIGS = [LoraConfig, QLoraConfig, AdapterConfig, PromptTuningConfig, PrefixTuningConfig, FullConfig, QatConfig]
register_stage("finetune", CONFIGS, apply_finetune, changes_model=True,
               summary="Fine-tune: LoRA, QLoRA (+LoftQ), adapters, prompt/prefix tuning, full, QAT; "
                       "1 or N processes.")
