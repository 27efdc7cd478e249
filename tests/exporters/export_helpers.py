"""Shared pieces of the exporter tests: tiny Llamas, RTN quantization through the stage, a BPE tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def llama(hidden: int = 64, intermediate: int = 128, heads: int = 4, kv_heads: int = 2, layers: int = 2,
          vocab: int = 259, seed: int = 0, tie: bool = True):
    """A random LlamaForCausalLM (GQA); larger widths than the suite's default where a format needs them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def rtn(model, bits: int, group_size: int, symmetric: bool, targets: list[str] | None = None):
    """Quantize `model` in place with the quantize stage's RTN method; returns it."""
    from effopt.stages.quantize import RtnConfig, apply_rtn

    cfg = RtnConfig(bits=bits, group_size=group_size, symmetric=symmetric, **({"targets": targets} if targets else {}))
    apply_rtn(cfg, SimpleNamespace(model=model))
    return model


def bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with real merges, trained on a slice of Emma (package data)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from effopt.data import read_text

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = read_text("builtin:austen/emma")[:60000]
    tok.train_from_iterator([text[i:i + 1000] for i in range(0, len(text), 1000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of one batch."""
    return model(input_ids=ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def token_ids(n: int = 24, vocab: int = 250, seed: int = 0) -> torch.Tensor:
    """A fixed random batch of one sequence."""
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))
