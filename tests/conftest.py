"""Shared fixtures: tiny random Llama models and a byte-level tokenizer built in code (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton reads this when kernels are decorated: set it before anything imports kernels/, so
    # every kernel in every test runs under the interpreter on a machine without a GPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = Path(__file__).resolve().parent.parent


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges (vocab = 256 bytes + specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab: int = 259, tie: bool = True):
    """A random LlamaForCausalLM small enough for unit tests (GQA like SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny-model ops take microseconds, and on a busy 2-core machine each
    thread hand-off costs milliseconds (100x slower, measured). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face folder with a tiny random Llama and the byte tokenizer (recipes load it by path)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def exact_quant_path(monkeypatch):
    """QuantLinear without its CPU fast path (torch's int4/int8 ops compute in bfloat16, ~1e-3 relative):
    for tests that claim exact equality with the dequantized weight (exports, QAT conversion)."""
    from effopt.nn import cpu_qmatmul

    monkeypatch.setattr(cpu_qmatmul, "ENABLED", False)


def pytest_collection_modifyitems(config, items):
    """Integration tests on the real model are marked `real`; the slowest also `slow`."""
    if os.environ.get("EFFOPT_SKIP_SLOW") != "1":
        return
    skip = pytest.mark.skip(reason="EFFOPT_SKIP_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
