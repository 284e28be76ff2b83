"""Running a GGUF file in llama.cpp: the llama.cpp build bundled in the ``gpt4all`` wheel (extra
``squeezer[llamacpp]``), called through its C API (``llama.h``) with :mod:`ctypes`.

:class:`LlamaCpp` loads a file on the CPU and :meth:`LlamaCpp.generate` runs greedy decoding from prompt token
ids: the prompt in one ``llama_decode`` call (prefill), then one call per generated token (decode), each new
token ``t_{i+1} = argmax_v logits_i[v]`` over llama.cpp's own next-token logits, which are returned with the
ids and the times. :meth:`LlamaCpp.tokenize` is llama.cpp's tokenizer of the file's vocabulary (loading checks
it: a ``gpt2`` vocabulary needs its merges, a pre-tokenizer name it knows and a newline token).

The GGUF file must be trusted (for instance one squeezer wrote): llama.cpp's own parser reads it, native code
that is not hardened against hostile files. The bundled build uses AVX2, which loading checks the CPU has.

gpt4all's own Python API (``GPT4All`` / ``LLModel``) loads the same files but takes text only and hands back
generated ids without logits, so the C API is called here.

The structures below are those of the ``llama.h`` shipped in gpt4all 2.8.2 (llama.cpp of mid-2024), the
version :data:`GPT4ALL_VERSION` this module is written for.
"""

from __future__ import annotations

import ctypes
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, ModelError

GPT4ALL_VERSION = "2.8.2"
LIBRARY = "libllamamodel-mainline-kompute.so"
"""The bundled llama.cpp build that runs on the CPU when no GPU is asked for (it uses AVX2)."""


class _ModelParams(ctypes.Structure):
    _fields_ = [("n_gpu_layers", ctypes.c_int32), ("split_mode", ctypes.c_int), ("main_gpu", ctypes.c_int32),
                ("tensor_split", ctypes.c_void_p), ("rpc_servers", ctypes.c_char_p),
                ("progress_callback", ctypes.c_void_p), ("progress_callback_user_data", ctypes.c_void_p),
                ("kv_overrides", ctypes.c_void_p), ("vocab_only", ctypes.c_bool), ("use_mmap", ctypes.c_bool),
                ("use_mlock", ctypes.c_bool), ("check_tensors", ctypes.c_bool)]


class _ContextParams(ctypes.Structure):
    _fields_ = [("seed", ctypes.c_uint32), ("n_ctx", ctypes.c_uint32), ("n_batch", ctypes.c_uint32),
                ("n_ubatch", ctypes.c_uint32), ("n_seq_max", ctypes.c_uint32), ("n_threads", ctypes.c_uint32),
                ("n_threads_batch", ctypes.c_uint32), ("rope_scaling_type", ctypes.c_int),
                ("pooling_type", ctypes.c_int), ("attention_type", ctypes.c_int),
                ("rope_freq_base", ctypes.c_float), ("rope_freq_scale", ctypes.c_float),
                ("yarn_ext_factor", ctypes.c_float), ("yarn_attn_factor", ctypes.c_float),
                ("yarn_beta_fast", ctypes.c_float), ("yarn_beta_slow", ctypes.c_float),
                ("yarn_orig_ctx", ctypes.c_uint32), ("defrag_thold", ctypes.c_float),
                ("cb_eval", ctypes.c_void_p), ("cb_eval_user_data", ctypes.c_void_p),
                ("type_k", ctypes.c_int), ("type_v", ctypes.c_int), ("logits_all", ctypes.c_bool),
                ("embeddings", ctypes.c_bool), ("offload_kqv", ctypes.c_bool), ("flash_attn", ctypes.c_bool),
                ("abort_callback", ctypes.c_void_p), ("abort_callback_data", ctypes.c_void_p)]


class _Batch(ctypes.Structure):
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)),
                ("embd", ctypes.c_void_p), ("pos", ctypes.c_void_p), ("n_seq_id", ctypes.c_void_p),
                ("seq_id", ctypes.c_void_p), ("logits", ctypes.c_void_p), ("all_pos_0", ctypes.c_int32),
                ("all_pos_1", ctypes.c_int32), ("all_seq_id", ctypes.c_int32)]


_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_library: ctypes.CDLL | None = None
_log_lines: list[str] = []


@_LOG
def _log(level: int, text: bytes, _: int) -> None:
    """llama.cpp's log, kept (bounded) for error messages instead of printed."""
    _log_lines.append(text.decode(errors="replace"))
    del _log_lines[:-50]


def _free(lib: ctypes.CDLL, handles: dict[str, int]) -> None:
    """Free the llama.cpp ``context`` then ``model`` that ``handles`` still holds (each once)."""
    if handles.get("context"):
        lib.llama_free(handles.pop("context"))
    if handles.get("model"):
        lib.llama_free_model(handles.pop("model"))


def require_avx2(cpuinfo: Path = Path("/proc/cpuinfo")) -> None:
    """A :class:`ConfigError` on Linux when ``cpuinfo``'s ``flags`` lack ``avx2`` (the bundled build would die
    on an illegal instruction); elsewhere nothing is checked."""
    if not sys.platform.startswith("linux") or not cpuinfo.exists():
        return
    flags = {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    if "avx2" not in flags:
        raise ConfigError(f"the llama.cpp build {LIBRARY} bundled in gpt4all needs a CPU with AVX2; "
                          f"{cpuinfo} lists no avx2 flag")


def _load_library() -> ctypes.CDLL:
    """The bundled llama.cpp, its signatures declared and its backend started once."""
    global _library
    if _library is not None:
        return _library
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    try:
        installed = version("gpt4all")
    except PackageNotFoundError as err:
        raise ConfigError("running a GGUF file in llama.cpp needs gpt4all: pip install 'squeezer[llamacpp]'") from err
    if installed != GPT4ALL_VERSION:
        raise ConfigError(f"gpt4all {installed} is installed; its bundled llama.h is read here as that of "
                          f"gpt4all {GPT4ALL_VERSION}: pip install gpt4all=={GPT4ALL_VERSION}")
    require_avx2()
    package = Path(find_spec("gpt4all").origin).parent  # located, not imported: its import loads other libraries
    lib = ctypes.CDLL(str(package / "llmodel_DO_NOT_MODIFY" / "build" / LIBRARY))
    signatures = {
        "llama_log_set": ([_LOG, ctypes.c_void_p], None),
        "llama_backend_init": ([], None),
        "llama_model_default_params": ([], _ModelParams),
        "llama_context_default_params": ([], _ContextParams),
        "llama_load_model_from_file": ([ctypes.c_char_p, _ModelParams], ctypes.c_void_p),
        "llama_new_context_with_model": ([ctypes.c_void_p, _ContextParams], ctypes.c_void_p),
        "llama_free": ([ctypes.c_void_p], None),
        "llama_free_model": ([ctypes.c_void_p], None),
        "llama_n_vocab": ([ctypes.c_void_p], ctypes.c_int32),
        "llama_tokenize": ([ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32),
                            ctypes.c_int32, ctypes.c_bool, ctypes.c_bool], ctypes.c_int32),
        "llama_kv_cache_clear": ([ctypes.c_void_p], None),
        "llama_batch_get_one": ([ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.c_int32, ctypes.c_int32],
                                _Batch),
        "llama_decode": ([ctypes.c_void_p, _Batch], ctypes.c_int32),
        "llama_get_logits": ([ctypes.c_void_p], ctypes.POINTER(ctypes.c_float)),
    }
    for name, (args, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    lib.llama_log_set(_log, None)
    lib.llama_backend_init()
    _library = lib
    return lib


@dataclass
class Generation:
    """Greedy tokens from llama.cpp: ``ids`` (n), the logits that chose each ``(n, vocab)``, the prefill time
    (the prompt in one call, giving ``ids[0]``) and the decode time (``n - 1`` one-token calls)."""

    ids: list[int]
    logits: np.ndarray
    prefill_s: float
    decode_s: float


class LlamaCpp:
    """The GGUF file ``path`` loaded in llama.cpp on the CPU with a context of ``n_ctx`` tokens, run by
    ``threads`` threads; a context manager (:meth:`close` frees it; so does garbage collection of an unclosed
    one)."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int = 2) -> None:
        self.lib = _load_library()
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"GGUF file {self.path} does not exist")
        self.n_ctx = n_ctx
        _log_lines.clear()
        self.model = self.lib.llama_load_model_from_file(str(self.path).encode(),
                                                          self.lib.llama_model_default_params())
        self._handles = {"model": self.model}
        self._finalizer = weakref.finalize(self, _free, self.lib, self._handles)
        if not self.model:
            raise ModelError(f"llama.cpp cannot load {self.path}: {self._log_excerpt()}")
        params = self.lib.llama_context_default_params()
        params.n_ctx, params.n_batch = n_ctx, n_ctx  # any prompt that fits the context is one decode call
        params.n_threads, params.n_threads_batch = threads, threads
        self.context = self.lib.llama_new_context_with_model(self.model, params)
        self._handles["context"] = self.context
        if not self.context:
            self.close()
            raise ModelError(f"llama.cpp cannot make a context of {n_ctx} tokens for {self.path}: "
                             f"{self._log_excerpt()}")
        self.vocab = self.lib.llama_n_vocab(self.model)

    @staticmethod
    def _log_excerpt() -> str:
        lines = [line.strip() for line in _log_lines if "error" in line.lower() or "failed" in line.lower()]
        return " | ".join(lines[-3:]) or "no error logged"

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids of ``text`` (no beginning-of-text token added, special tokens read as text)."""
        data = text.encode()
        room = len(data) + 1
        ids = (ctypes.c_int32 * room)()
        n = self.lib.llama_tokenize(self.model, data, len(data), ids, room, False, False)
        if n < 0:
            raise ModelError(f"llama.cpp could not tokenize {len(data)} bytes with the vocabulary of {self.path}")
        return list(ids[:n])

    def _decode(self, tokens: list[int], position: int) -> np.ndarray:
        """Run ``tokens`` at positions ``position...``; the next-token logits after the last one ``(vocab,)``."""
        array = (ctypes.c_int32 * len(tokens))(*tokens)
        code = self.lib.llama_decode(self.context, self.lib.llama_batch_get_one(array, len(tokens), position, 0))
        if code != 0:
            raise ModelError(f"llama.cpp: decoding {len(tokens)} tokens at position {position} of {self.path} "
                             f"failed (code {code}): {self._log_excerpt()}")
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.context), shape=(self.vocab,)).copy()

    def generate(self, prompt: Sequence[int], n: int) -> Generation:
        """Greedy decoding of ``n`` tokens after the token ids ``prompt``, from an empty cache (the cache holds the
        prompt and the first ``n - 1`` new tokens: the last one is never decoded)."""
        prompt = [int(t) for t in prompt]
        if not prompt or n < 1:
            raise ConfigError(f"greedy generation needs prompt token ids and n >= 1 (got {len(prompt)} ids, n={n})")
        if len(prompt) + n - 1 > self.n_ctx:
            raise ConfigError(f"{len(prompt)} prompt tokens + {n - 1} new ones to decode (of {n}) exceed the context "
                              f"of {self.n_ctx}")
        if not all(0 <= t < self.vocab for t in prompt):
            raise DataError(f"prompt token ids must lie in [0, {self.vocab}) for {self.path}")
        self.lib.llama_kv_cache_clear(self.context)
        start = time.perf_counter()
        logits = [self._decode(prompt, 0)]
        prefill = time.perf_counter() - start
        ids = [int(logits[-1].argmax())]
        start = time.perf_counter()
        for step in range(n - 1):
            logits.append(self._decode([ids[-1]], len(prompt) + step))
            ids.append(int(logits[-1].argmax()))
        return Generation(ids, np.stack(logits), prefill, time.perf_counter() - start)

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        self._finalizer()
        self.context = self.model = None

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
