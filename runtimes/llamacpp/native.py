"""llama.cpp's own C library, called from Python: the prebuilt ``libllama`` that ships inside the pinned npm package.

``node-llama-cpp`` 3.21.1 carries llama.cpp built for each platform (``@node-llama-cpp/linux-x64/bins/linux-x64``:
``libllama``, ``libggml`` and one ``libggml-cpu-*`` per CPU generation, of which ggml loads the best one). Calling
that library through ``ctypes`` reads logits as float arrays: a next-token NLL costs a log-sum-exp, where the
JavaScript API builds a sorted map of the whole vocabulary per token (~0.1 s per token at Gemma's 262k entries).

The structures below restate ``include/llama.h`` of that release (the sources ship beside the binaries as
``llama/gitRelease.bundle``); they must change when the pin does, and ``tests/test_llamacpp.py`` checks that the
library's own defaults read back as that header documents them (a shifted field would not).

Nothing here protects the calling process from a crash inside llama.cpp: ``qaft`` runs it in a child process
(``worker.py``)."""

from __future__ import annotations

import ctypes as C
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLATFORMS = {("linux", "x86_64"): "linux-x64", ("linux", "aarch64"): "linux-arm64"}
LIBRARY = "libllama.v0.4.0.so"

LOG_ERROR = 4  # enum ggml_log_level


MODULES = "QAFT_LLAMACPP_MODULES"
"""Environment: the ``node_modules`` folder that holds node-llama-cpp, where it is not this folder's own."""


def modules() -> Path:
    return Path(os.environ.get(MODULES) or HERE / "node_modules")


def platform_name() -> str:
    return f"{sys.platform}/{platform.machine()}"


def bins() -> Path | None:
    """The folder of prebuilt libraries for this machine, or None where the package has none."""
    name = PLATFORMS.get((sys.platform, platform.machine()))
    if name is None:
        return None
    return modules() / "@node-llama-cpp" / name / "bins" / name


class ModelParams(C.Structure):
    _fields_ = [
        ("devices", C.c_void_p),
        ("tensor_buft_overrides", C.c_void_p),
        ("n_gpu_layers", C.c_int32),
        ("split_mode", C.c_int),
        ("load_mode", C.c_int),
        ("lazy_mode", C.c_int),
        ("main_gpu", C.c_int32),
        ("tensor_split", C.c_void_p),
        ("progress_callback", C.c_void_p),
        ("progress_callback_user_data", C.c_void_p),
        ("kv_overrides", C.c_void_p),
        ("vocab_only", C.c_bool),
        ("check_tensors", C.c_bool),
        ("use_extra_bufts", C.c_bool),
        ("no_host", C.c_bool),
        ("no_alloc", C.c_bool),
        ("load_mtp", C.c_bool),
    ]


class ContextParams(C.Structure):
    _fields_ = [
        *((name, C.c_uint32) for name in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_rs_seq", "n_outputs_max", "n_outputs_max_per_seq")),
        ("n_threads", C.c_int32),
        ("n_threads_batch", C.c_int32),
        *((name, C.c_int) for name in ("ctx_type", "rope_scaling_type", "pooling_type", "attention_type", "flash_attn_type")),
        *((name, C.c_float) for name in ("rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow")),
        ("yarn_orig_ctx", C.c_uint32),
        ("defrag_thold", C.c_float),
        ("cb_eval", C.c_void_p),
        ("cb_eval_user_data", C.c_void_p),
        ("type_k", C.c_int),
        ("type_v", C.c_int),
        ("abort_callback", C.c_void_p),
        ("abort_callback_data", C.c_void_p),
        *((name, C.c_bool) for name in ("embeddings", "offload_kqv", "no_perf", "op_offload", "swa_full", "kv_unified")),
        ("samplers", C.c_void_p),
        ("n_samplers", C.c_size_t),
        ("ctx_other", C.c_void_p),
    ]


class Batch(C.Structure):
    _fields_ = [
        ("n_tokens", C.c_int32),
        ("token", C.POINTER(C.c_int32)),
        ("embd", C.POINTER(C.c_float)),
        ("pos", C.POINTER(C.c_int32)),
        ("n_seq_id", C.POINTER(C.c_int32)),
        ("seq_id", C.POINTER(C.POINTER(C.c_int32))),
        ("logits", C.POINTER(C.c_int8)),
    ]


LOG_CALLBACK = C.CFUNCTYPE(None, C.c_int, C.c_char_p, C.c_void_p)
P = C.c_void_p
SIGNATURES = {
    "llama_backend_init": ([], None),
    "llama_log_set": ([LOG_CALLBACK, P], None),
    "llama_model_default_params": ([], ModelParams),
    "llama_context_default_params": ([], ContextParams),
    "llama_model_load_from_file": ([C.c_char_p, ModelParams], P),
    "llama_model_free": ([P], None),
    "llama_init_from_model": ([P, ContextParams], P),
    "llama_free": ([P], None),
    "llama_model_get_vocab": ([P], P),
    "llama_vocab_n_tokens": ([P], C.c_int32),
    "llama_get_memory": ([P], P),
    "llama_memory_clear": ([P, C.c_bool], None),
    "llama_decode": ([P, Batch], C.c_int32),
    "llama_get_logits_ith": ([P, C.c_int32], C.POINTER(C.c_float)),
    "llama_adapter_lora_init": ([P, C.c_char_p], P),
    "llama_adapter_lora_free": ([P], None),
    "llama_set_adapters_lora": ([P, C.POINTER(P), C.c_size_t, C.POINTER(C.c_float)], C.c_int32),
    "llama_batch_init": ([C.c_int32, C.c_int32, C.c_int32], Batch),
    "llama_batch_free": ([Batch], None),
    "llama_tokenize": ([P, C.c_char_p, C.c_int32, C.POINTER(C.c_int32), C.c_int32, C.c_bool, C.c_bool], C.c_int32),
}


class LlamaError(RuntimeError):
    """llama.cpp refused (a file it cannot load, a decode that failed): the first error it logged says why."""


class Library:
    """The loaded library (once per process) and the error lines llama.cpp logged since the last ``take_errors``."""

    def __init__(self, folder: Path):
        self.folder = folder
        ggml = C.CDLL(str(folder / "libggml.v0.4.0.so"), mode=C.RTLD_GLOBAL)
        self.lib = C.CDLL(str(folder / LIBRARY), mode=C.RTLD_GLOBAL)
        for name, (args, result) in SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, result
        self.errors: list[str] = []
        self._log = LOG_CALLBACK(self._on_log)  # kept: llama.cpp holds the pointer
        self.lib.llama_log_set(self._log, None)
        ggml.ggml_backend_load_all_from_path.argtypes = [C.c_char_p]
        ggml.ggml_backend_load_all_from_path(str(folder).encode())  # the CPU variant this machine runs best
        self.lib.llama_backend_init()

    def _on_log(self, level: int, text: bytes, _user) -> None:
        if level == LOG_ERROR and text and text.strip():
            self.errors.append(text.decode(errors="replace").strip())

    def __getattr__(self, name: str):
        return getattr(self.lib, name)

    def take_errors(self) -> list[str]:
        out, self.errors = self.errors, []
        return out

    def fail(self, what: str) -> LlamaError:
        errors = self.take_errors()
        return LlamaError(f"{what} ({errors[0]})" if errors else what)


@cache
def library() -> Library:
    folder = bins()
    if folder is None or not (folder / LIBRARY).is_file():
        raise LlamaError(f"no prebuilt llama.cpp for {platform_name()} in {modules()}")
    return Library(folder)


@contextmanager
def model(path: Path) -> Iterator[int]:
    lib = library()
    params = lib.llama_model_default_params()
    params.n_gpu_layers = 0
    handle = lib.llama_model_load_from_file(str(path).encode(), params)
    if not handle:
        raise lib.fail(f"{path}: llama.cpp cannot load it")
    try:
        yield handle
    finally:
        lib.llama_model_free(handle)


def tokenize(model_handle: int, text: str) -> list[int]:
    """llama.cpp's own tokenization of ``text``, without BOS (the by-hand mode reads plain text)."""
    lib = library()
    raw = text.encode()
    room = len(raw) + 8  # never more tokens than bytes
    ids = (C.c_int32 * room)()
    n = lib.llama_tokenize(lib.llama_model_get_vocab(model_handle), raw, len(raw), ids, room, False, False)
    if n < 0:
        raise lib.fail(f"llama.cpp cannot tokenize {len(raw)} bytes")
    return list(ids[:n])


@contextmanager
def context(model_handle: int, n_ctx: int, threads: int, adapter: Path | None = None) -> Iterator[Context]:
    """One sequence of ``n_ctx`` tokens, decoded in one batch of up to ``n_ctx`` (llama.cpp picks its matrix kernels by
    batch size: one window per batch keeps the numbers independent of scheduling)."""
    lib = library()
    params = lib.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
    params.n_threads = params.n_threads_batch = threads
    # flash attention stays at llama.cpp's default (auto: on for CPU), as node-llama-cpp runs it and llama.cpp's own
    # tools do; without it this build's attention reads SmolLM2 0.04 % worse (NLL 13.160 vs 13.154, transformers 13.154)
    params.swa_full = False
    handle = lib.llama_init_from_model(model_handle, params)
    if not handle:
        raise lib.fail("llama.cpp cannot create a context")
    lora = None
    try:
        if adapter is not None:
            lora = lib.llama_adapter_lora_init(model_handle, str(adapter).encode())
            if not lora:
                raise lib.fail(f"{adapter}: llama.cpp cannot load it")
            if lib.llama_set_adapters_lora(handle, (P * 1)(lora), 1, (C.c_float * 1)(1.0)) != 0:
                raise lib.fail(f"{adapter}: llama.cpp cannot apply it")
        yield Context(lib, model_handle, handle, n_ctx)
    finally:
        lib.llama_free(handle)
        if lora:
            lib.llama_adapter_lora_free(lora)


class Context:
    def __init__(self, lib: Library, model_handle: int, handle: int, n_ctx: int):
        self.lib, self.model_handle, self.handle, self.n_ctx = lib, model_handle, handle, n_ctx
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model_handle))

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.handle), True)

    def decode(self, tokens: list[int], start: int, outputs: bool) -> None:
        """Append ``tokens`` at position ``start``; logits for every one of them (``outputs``) or the last alone."""
        n = len(tokens)
        batch = self.lib.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = t, start + i, 1, 0
                batch.logits[i] = 1 if outputs or i == n - 1 else 0
            batch.n_tokens = n
            if self.lib.llama_decode(self.handle, batch) != 0:
                raise self.lib.fail(f"llama_decode failed on {n} tokens at position {start}")
        finally:
            self.lib.llama_batch_free(batch)

    def logits(self, i: int):
        """The logits of output ``i`` of the last decode (-1: the last), as a float32 numpy view."""
        import numpy as np

        ptr = self.lib.llama_get_logits_ith(self.handle, i)
        if not ptr:
            raise self.lib.fail(f"llama.cpp holds no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
