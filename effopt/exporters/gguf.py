"""format: gguf: one .gguf file for llama.cpp (and transformers' GGUF reader), written with `gguf`.

Llama-architecture models only (SmolLM2 and the tests' tiny Llama). Norms stay F32; every 2-D
weight is stored as `gguf_type` (F16, Q8_0, Q4_0, Q4_1 or Q4_K), except that 4-bit files keep the
output projection (lm_head, or the embedding tied to it) at Q8_0, as llama.cpp's quantizer keeps it
above the file's type. A tensor whose rows do not fit the type's block (32, or 256 for Q4_K) falls
back to Q4_0 for Q4_K, else to F16; the manifest lists each tensor's type. Two facts of the format
matter here:
- llama.cpp applies rotary embeddings to adjacent pairs, transformers' Llama to the two halves of
  each head, so q_proj and k_proj rows are permuted per head (transformers' reader undoes it).
- An effopt QuantLinear whose layout *is* the requested block (4-bit symmetric, group 32 -> Q4_0;
  4-bit asymmetric, group 32 -> Q4_1; 8-bit symmetric, group 32 -> Q8_0) has its codes written
  as they are, scales rounded to fp16: no second quantization. Other layers are dequantized and
  quantized to the requested type.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from effopt.exporters import commit, fresh_tmp, package_version
from effopt.exporters.gguf_quants import codes_to_q4_0, codes_to_q4_1, codes_to_q8_0, q4_k_quantize

GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K")
BLOCK = {"F32": 1, "F16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256}
FALLBACK = {"Q4_K": "Q4_0"}
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K": 15}  # llama.cpp's LlamaFileType
# The output projection (lm_head, or the embedding when tied to it) is the most sensitive matrix:
# like llama.cpp's own quantizer (which uses Q6_K there), 4-bit files keep it at 8 bits.
OUTPUT_TYPE = {"Q4_0": "Q8_0", "Q4_1": "Q8_0", "Q4_K": "Q8_0"}
# (bits, symmetric) of an effopt QuantLinear (group 32) that a GGUF type stores exactly.
TRANSFERABLE = {"Q4_0": (4, True), "Q4_1": (4, False), "Q8_0": (8, True)}


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from transformers' half-split rotary layout to llama.cpp's pairwise one."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_theta(config) -> float:
    """The rotary base, wherever this transformers version keeps it."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise ValueError(f"gguf export: rope type {kind!r} is not supported (only the default rotary embedding)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def head_counts(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def write_llama_metadata(writer, config, name: str, gguf_type: str) -> None:
    """Hyperparameters llama.cpp and transformers read for the llama architecture."""
    heads, kv, head_dim = head_counts(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPE[gguf_type])
    writer.add_quantization_version(2)


def write_tokenizer(writer, tokenizer, vocab_size: int, pre: str = "default") -> dict:
    """A byte-level BPE tokenizer as `gpt2`-model GGUF metadata; returns what was written."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"gguf export: only byte-level BPE tokenizers are supported, got {spec['model']['type']}")
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["special"] for t in spec.get("added_tokens", [])}
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    if len(vocab) > vocab_size:
        raise ValueError(f"gguf export: tokenizer has {len(vocab)} tokens, the model's embedding {vocab_size}")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [5] * vocab_size  # 5 = UNUSED
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = 1 if token not in special else (3 if special[token] else 4)  # NORMAL, CONTROL, USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)  # gguf drops an empty list; llama.cpp then refuses the tokenizer
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids[key] is not None:
            add(int(ids[key]))
    probe = tokenizer("a")["input_ids"]
    adds_bos = bool(probe) and ids["bos"] is not None and probe[0] == ids["bos"]
    writer.add_add_bos_token(adds_bos)
    info = {"model": "gpt2", "pre": pre, "tokens": len(vocab), "merges": len(merges), "add_bos": adds_bos}
    if not merges:
        info["warning"] = "the tokenizer has no merges; GGUF cannot store an empty merge list, so llama.cpp " \
                          "and transformers can load the weights but not this tokenizer from the file"
    return info


def _quantize(w: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, str]:
    """Float weight -> (array for GGUFWriter, type actually used)."""
    from gguf import GGMLQuantizationType, quants

    kind = gguf_type
    while w.shape[-1] % BLOCK[kind]:
        kind = FALLBACK.get(kind, "F16")
    x = w.detach().float().cpu().numpy()
    if kind == "F32":
        return x, kind
    if kind == "F16":
        return x.astype(np.float16), kind
    if kind == "Q4_K":
        return q4_k_quantize(x), kind
    return quants.quantize(x, GGMLQuantizationType[kind]), kind


def _transfer(layer, rows: torch.Tensor | None, gguf_type: str) -> np.ndarray | None:
    """Bytes of an effopt QuantLinear written as-is when its layout is `gguf_type`'s block, else None."""
    if TRANSFERABLE.get(gguf_type) != (layer.bits, bool(layer.symmetric)) or layer.group_size != 32 \
            or layer.in_features % 32:
        return None
    codes, scales, zeros = layer.codes(), layer.scales.float(), layer.zeros.float()
    if rows is not None:
        codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
    c, s, z = codes.cpu().numpy(), scales.cpu().numpy(), zeros.cpu().numpy()
    if gguf_type == "Q4_0":
        return codes_to_q4_0(c, s)
    if gguf_type == "Q4_1":
        return codes_to_q4_1(c, s, z)
    return codes_to_q8_0(c, s)


def _gguf_name(name: str, name_map) -> str:
    base, _, suffix = name.rpartition(".")
    mapped = name_map.get_name(base)
    if mapped is None:
        raise ValueError(f"gguf export: no GGUF name for tensor {name!r} (unsupported architecture piece)")
    return f"{mapped}.{suffix}"


def model_tensors(model, gguf_type: str):
    """Yield (gguf name, array, ggml type name, how) for every tensor of a Llama model."""
    import gguf

    from effopt.exporters.hf import densify
    from effopt.nn.quant_linear import QuantLinear

    config = model.config
    heads, kv, _ = head_counts(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    quant = {n: m for n, m in model.named_modules() if type(m) is QuantLinear}  # LoRA over codes: merged
    dense = densify(model)
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in dense.state_dict().items():
        if (tied and name == "lm_head.weight") or "rotary_emb" in name:
            continue
        n_head = heads if name.endswith("q_proj.weight") else kv if name.endswith("k_proj.weight") else None
        perm = permute_rows(torch.arange(tensor.shape[0]), n_head) if n_head else None
        layer = quant.get(name.removesuffix(".weight"))
        raw = _transfer(layer, perm, gguf_type) if layer is not None else None
        if raw is not None:
            yield _gguf_name(name, name_map), raw, gguf_type, "transferred"
            continue
        w = tensor if perm is None else tensor[perm]
        output = name == "lm_head.weight" or (tied and name.endswith("embed_tokens.weight"))
        kind = "F32" if w.ndim == 1 else OUTPUT_TYPE.get(gguf_type, gguf_type) if output else gguf_type
        array, used = _quantize(w, kind)
        how = "output layer, kept at higher precision" if kind != gguf_type and w.ndim > 1 else \
            "quantized" if used not in ("F32", "F16") else "float"
        yield _gguf_name(name, name_map), array, used, how


def export_gguf(model, tokenizer, out: Path, manifest: dict, gguf_type: str = "Q8_0",
                tokenizer_pre: str = "default") -> dict:
    """Write `out/model-<type>.gguf` and the manifest; return metrics.

    Args:
        gguf_type: F32, F16, Q8_0, Q4_0, Q4_1 or Q4_K for the 2-D weights.
        tokenizer_pre: llama.cpp's pre-tokenizer name (`smollm` for SmolLM2; `default` otherwise).
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    if model.config.model_type != "llama":
        raise ValueError(f"gguf export supports the llama architecture, got {model.config.model_type!r}")
    if getattr(model.config, "attention_bias", False) or getattr(model.config, "mlp_bias", False):
        raise ValueError("gguf export: Llama variants with linear biases are not supported")
    tmp = fresh_tmp(Path(out))
    filename = f"model-{gguf_type}.gguf"
    writer = gguf.GGUFWriter(str(tmp / filename), "llama")
    write_llama_metadata(writer, model.config, manifest.get("recipe", {}).get("name", "effopt"), gguf_type)
    tok_info = write_tokenizer(writer, tokenizer, model.config.vocab_size, tokenizer_pre)
    tensors = {}
    for name, array, kind, how in model_tensors(model, gguf_type):
        raw_dtype = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
        tensors[name] = {"type": kind, "how": how}
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    counts = {k: sum(1 for t in tensors.values() if t["type"] == k) for k in sorted({t["type"] for t in tensors.values()})}
    manifest = dict(manifest)
    manifest["format"] = {"name": "gguf", "gguf_type": gguf_type, "files": {"gguf": filename},
                          "architecture": "llama", "tensor_types": counts, "tensors": tensors,
                          "transferred": sorted(n for n, t in tensors.items() if t["how"] == "transferred"),
                          "tokenizer": tok_info, "gguf_package": package_version("gguf"),
                          "loads_with": ["llama.cpp", "transformers (gguf_file=...)"]}
    size = commit(tmp, Path(out), manifest)
    return {"export_path": str(out), "export_bytes": size,
            "export_weights_bytes": (Path(out) / filename).stat().st_size}
