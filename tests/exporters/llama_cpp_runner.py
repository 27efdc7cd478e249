"""llama.cpp's own forward pass on a GGUF file, through the prebuilt CPU build that llama-cpp-cffi ships.

Test support for the GGUF exporter. Only the package's cffi extension (llama.cpp's C API) is loaded, by file:
importing `llama` or any of its submodules runs its __init__, which needs transformers<5 (hence --no-deps).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install --no-deps llama-cpp-cffi==0.4.42; pip install cffi"

# GCC 14's definition: code built with it calls this when an exception leaves a noexcept function
_CXA_CALL_TERMINATE = """
#include <exception>
extern "C" void *__cxa_begin_catch(void *) noexcept;
extern "C" [[noreturn]] void __cxa_call_terminate(void *e) noexcept { if (e) __cxa_begin_catch(e); std::terminate(); }
"""


def _provide_cxa_call_terminate() -> None:
    """The wheel is built with GCC 14 and needs libstdc++ >= 14 for one symbol, __cxa_call_terminate; older ones
    (Debian 12 has GCC 12's) lack it and the extension fails to load. Build that symbol with the system's C++
    compiler and load it globally first, so the dynamic linker finds it."""
    if hasattr(ctypes.CDLL("libstdc++.so.6"), "__cxa_call_terminate"):
        return
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise ImportError("llama-cpp-cffi's build needs libstdc++ >= 14, or a C++ compiler to supply "
                          "__cxa_call_terminate")
    with tempfile.TemporaryDirectory(prefix="effopt-llama-cpp-") as tmp:
        shim = Path(tmp) / "cxa_call_terminate.so"
        subprocess.run([cxx, "-shared", "-fPIC", "-O2", "-x", "c++", "-", "-o", str(shim)], input=_CXA_CALL_TERMINATE,
                       text=True, capture_output=True, check=True)
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)  # stays mapped once the file is gone


_quiet = None  # the log callback


@functools.cache
def llama_cpp_api():
    """(ffi, lib) of llama.cpp's C API; ImportError (with the install command) when it cannot be had."""
    spec = importlib.util.find_spec("llama")  # finds the package without running its __init__
    found = sorted(Path(spec.origin).parent.glob("_llama_cpp_cpu.*.so")) if spec and spec.origin else []
    if not found:
        raise ImportError(f"llama-cpp-cffi is not installed ({INSTALL_HINT})")
    _provide_cxa_call_terminate()
    so_spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", found[0])
    try:
        module = importlib.util.module_from_spec(so_spec)  # dlopen happens here
        so_spec.loader.exec_module(module)
    except ImportError as exc:  # e.g. cffi (its _cffi_backend) missing
        raise ImportError(f"llama-cpp-cffi cannot be loaded: {exc} ({INSTALL_HINT})") from exc
    ffi, lib = module.ffi, module.lib
    # silence llama.cpp's (and ggml's) load-time logging; the callback must outlive every call, hence a global
    global _quiet
    _quiet = ffi.callback("void(enum ggml_log_level, char *, void *)", lambda level, text, data: None)
    lib.llama_log_set(_quiet, ffi.NULL)
    lib.llama_backend_init()
    return ffi, lib


def llama_cpp_logits(gguf_path: str | Path, token_ids: list[int], n_threads: int = 2) -> np.ndarray:
    """Float32 logits [len(token_ids), vocab] of one sequence decoded in one batch by llama.cpp on the CPU.

    The ids go in as they are: no BOS is added, so the result compares with transformers on the same ids.
    """
    ffi, lib = llama_cpp_api()
    n = len(token_ids)
    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    if model == ffi.NULL:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    try:
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = max(n, 32)
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(model, cparams)
        if ctx == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not create a context for {gguf_path}")
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, token in enumerate(token_ids):  # one sequence (id 0), logits at every position
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = n
            if (rc := lib.llama_decode(ctx, batch)) != 0:
                raise RuntimeError(f"llama_decode returned {rc} on {gguf_path}")
            n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
            rows = []
            for i in range(n):
                row = lib.llama_get_logits_ith(ctx, i)
                if row == ffi.NULL:
                    raise RuntimeError(f"llama.cpp returned no logits at position {i}")
                rows.append(np.frombuffer(ffi.buffer(row, 4 * n_vocab), dtype=np.float32).copy())
            return np.stack(rows)
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)
    finally:
        lib.llama_model_free(model)
