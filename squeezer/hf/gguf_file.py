"""GGUF output: Q8_0 / Q4_0 blocks that carry squeezer's codes (presets ``q8_0`` and ``q4_0``).

A block is 32 consecutive weights of a row with one fp16 scale ``d``: Q8_0 stores ``d`` and 32 int8 codes
(``x^ = d q``); Q4_0 stores ``d`` and 16 bytes of nibbles ``u = q + 8`` (element ``j`` low, ``j + 16`` high;
``x^ = d (u - 8)``). Squeezer's grid is symmetric, ``d = max|x| / qmax`` with codes in ``[-qmax, qmax]``
(``qmax`` = 127 / 7); llama.cpp's own Q4_0 quantizer picks ``d = x_max / -8`` (the extreme value on code -8),
a different grid that the same block layout also holds. Other tensors are written as F32.

The file is laid out as llama.cpp's own converter lays it out (:class:`LlamaCppLayout`): tensor names from
``gguf``'s ``TensorNameMap`` (``blk.N.attn_q.weight``, ``token_embd.weight``, ...), the architecture's
hyperparameters under ``<arch>.*``, the vocabulary under ``tokenizer.ggml.*``; Llama's Q / K rows permuted
per head from Hugging Face's rotate-half order to llama.cpp's interleaved one (row ``h, 2, d/2 -> h, d/2, 2``,
codes and block scales move with their row); GPT-2's ``Conv1D`` weights transposed to ``(out, in)`` first, and
its token embedding also written as the output matrix ``output.weight`` when the folder stores no ``lm_head.weight``
of its own (tied in the model; llama.cpp's GPT-2 graph reads both).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..config import PRESETS, QuantConfig
from ..errors import ConfigError, DataError, ModelError
from ..quant.core import QTensor
from .folder import HFFolder, PretrainedResult, selected
from .weights import groups_fit, quantize_weight

BLOCK = 32
GGUF_PRESETS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
"""Presets whose grid is a GGUF block type, and that type's name in ``gguf.GGMLQuantizationType``."""


def gguf_type(cfg: QuantConfig) -> str:
    """The GGUF block type of ``cfg``'s weight grid (that of preset ``q8_0`` / ``q4_0``, any algorithm)."""
    qtype = next((t for name, t in GGUF_PRESETS.items() if PRESETS[name].weight == cfg.weight), None)
    if qtype is None or cfg.activation is not None:
        raise ConfigError(f"preset {cfg.name!r} has no GGUF block type; supported: {', '.join(GGUF_PRESETS)} "
                          "(with any algorithm suffix, e.g. q4_0-gptq)")
    return qtype


def blocks(qt: QTensor, qtype: str) -> np.ndarray:
    """The GGUF bytes of ``qt`` (codes ``(N, K)``, scales ``(N, K / 32)``): ``(N, K / 32 * block bytes)`` uint8."""
    n, k = qt.shape
    d = qt.qparams.scale.to(torch.float16).reshape(-1, 1).view(torch.uint8).numpy()
    codes = qt.codes.reshape(-1, BLOCK).numpy()
    if qtype == "Q8_0":
        qs = codes.astype(np.int8).view(np.uint8)
    else:
        u = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(-1, 2, BLOCK // 2)
        qs = u[:, 0] | (u[:, 1] << np.uint8(4))
    return np.concatenate([d, qs], axis=1).reshape(n, -1)


ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2", "gpt2": "GPT2"}
"""Model types written for llama.cpp, and their ``gguf.MODEL_ARCH`` member."""


def head_rows(n: int, heads: int) -> torch.Tensor:
    """The row order of llama.cpp's Q / K: output row ``i`` is source row ``perm[i]``, rows ``(h, 2, n/h/2)``
    read as ``(h, n/h/2, 2)`` (convert_hf_to_gguf's ``LlamaModel.permute``)."""
    return torch.arange(n).reshape(heads, 2, n // heads // 2).transpose(1, 2).reshape(-1)


class LlamaCppLayout:
    """Names, row orders and metadata of a llama.cpp GGUF for the folder ``source``."""

    def __init__(self, source: HFFolder) -> None:
        import gguf

        if source.model_type not in ARCHITECTURES:
            raise ConfigError(f"{source.path}: model_type {source.model_type!r} has no llama.cpp GGUF layout here; "
                              f"supported: {', '.join(ARCHITECTURES)}")
        self.source, c = source, source.config
        self.arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[source.model_type])
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.arch]
        self.blocks = c["n_layer"] if self.arch_name == "gpt2" else c["num_hidden_layers"]
        self.names = gguf.get_tensor_name_map(self.arch, self.blocks)
        self.tied_output = self.arch_name == "gpt2" and not any(
            name == "lm_head.weight" for shard in source.shards for name, _, _ in source.infos(shard))

    def name(self, hf_name: str) -> str:
        """llama.cpp's name of the stored tensor ``hf_name``."""
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"{self.source.path}: tensor {hf_name!r} has no llama.cpp name for architecture "
                             f"{self.arch_name!r}")
        return name

    def names_of(self, hf_name: str) -> list[str]:
        """Every llama.cpp name the stored tensor ``hf_name`` is written under (GPT-2's tied embedding twice)."""
        name = self.name(hf_name)
        return [name, "output.weight"] if self.tied_output and name == "token_embd.weight" else [name]

    def rows(self, hf_name: str, n: int) -> torch.Tensor | None:
        """Llama's Q / K row permutation of a tensor of ``n`` rows, else None."""
        c = self.source.config
        if self.arch_name != "llama":
            return None
        if hf_name.endswith("q_proj.weight"):
            return head_rows(n, c["num_attention_heads"])
        if hf_name.endswith("k_proj.weight"):
            return head_rows(n, c.get("num_key_value_heads") or c["num_attention_heads"])
        return None

    def write_metadata(self, writer, qtype) -> None:
        """Hyperparameters, file type and vocabulary, as convert_hf_to_gguf writes them."""
        import gguf

        c = self.source.config
        if self.arch_name == "gpt2":
            writer.add_context_length(c["n_positions"])
            writer.add_embedding_length(c["n_embd"])
            writer.add_feed_forward_length(c.get("n_inner") or 4 * c["n_embd"])
            writer.add_head_count(c["n_head"])
            writer.add_layer_norm_eps(c["layer_norm_epsilon"])
        else:
            writer.add_context_length(c["max_position_embeddings"])
            writer.add_embedding_length(c["hidden_size"])
            writer.add_feed_forward_length(c["intermediate_size"])
            writer.add_head_count(c["num_attention_heads"])
            writer.add_head_count_kv(c.get("num_key_value_heads") or c["num_attention_heads"])
            writer.add_rope_freq_base(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 1e4))
            writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
        writer.add_block_count(self.blocks)
        writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}"))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        self._write_vocab(writer, c["vocab_size"])

    def _write_vocab(self, writer, vocab_size: int) -> None:
        """The folder's ``tokenizer.json`` vocabulary as a BPE (``gpt2``) vocabulary: tokens by id (padded to
        ``vocab_size`` with unused ``[PAD<i>]`` entries), special tokens as control tokens, merges and special ids
        through ``gguf.SpecialVocab``, and the pre-tokenizer llama.cpp applies before the merges (``gpt-2``: GPT-2's
        regex, for a byte-level pre-tokenizer that splits by it; else ``default``). A folder without
        ``tokenizer.json`` gets no vocabulary."""
        import json

        import gguf
        from tokenizers import Tokenizer

        path = self.source.path / "tokenizer.json"
        if not path.exists():
            return
        tokenizer = Tokenizer.from_file(str(path))
        pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
        by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(vocab_size, len(by_id)))]
        kinds = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL if i in by_id
                 else gguf.TokenType.UNUSED for i, t in enumerate(tokens)]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                                 else "default")
        writer.add_token_list(tokens)
        writer.add_token_types(kinds)
        bpe = type(tokenizer.model).__name__ == "BPE"
        vocab = gguf.SpecialVocab(self.source.path, load_merges=bpe, n_vocab=len(tokens))
        vocab.add_to_gguf(writer, quiet=True)


class GGUFOut:
    """The GGUF file ``out`` under construction: :meth:`plan` every tensor (sizes follow from the shapes), then
    :meth:`write` each tensor's data in the planned order as it comes; written to ``.<name>.partial``, renamed
    onto ``out`` on leaving the ``with`` block without error."""

    def __init__(self, source: HFFolder, cfg: QuantConfig, out: Path) -> None:
        import gguf

        self.qtype = getattr(gguf.GGMLQuantizationType, gguf_type(cfg))
        if out.is_dir():
            raise DataError(f"output path {out} is a directory; the GGUF output is one file")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.partial = out.with_name(f".{out.name}.partial")
        self.layout = LlamaCppLayout(source)
        self.source = source
        self.writer = gguf.GGUFWriter(str(self.partial), self.layout.arch_name)
        self.layout.write_metadata(self.writer, self.qtype)
        self.writer.add_string("squeezer.preset", cfg.name)
        self.order: list[str] = []
        self._next = 0

    def plan(self, name: str, shape: tuple[int, ...], quantized: bool) -> None:
        """Tensor ``name`` (its stored shape; a ``Conv1D`` weight's is ``(in, out)``) comes next, as blocks when
        ``quantized``, under each of its llama.cpp names."""
        import gguf

        shape = shape[::-1] if self.source.transposed(name) else shape
        for gguf_name in self.layout.names_of(name):
            if quantized:
                stored = gguf.quant_shape_to_byte_shape(shape, self.qtype)
                self.writer.add_tensor_info(gguf_name, stored, np.dtype(np.uint8), int(np.prod(stored)),
                                            raw_dtype=self.qtype)
            else:
                self.writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            self.order.append(name)

    def __enter__(self) -> "GGUFOut":
        return self

    def start(self) -> None:
        """Write the header, metadata and tensor infos (after the last :meth:`plan`)."""
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write(self, name: str, data: torch.Tensor | QTensor) -> None:
        """The data of tensor ``name``: a float tensor as stored (written F32) or the codes of its Linear weight
        ``(out, in)`` (written as blocks), once per llama.cpp name it was planned under."""
        if self.order[self._next] != name:
            raise ModelError(f"GGUF output: tensor {name!r} comes out of order (expected {self.order[self._next]!r})")
        if isinstance(data, QTensor):
            array = blocks(data, self.qtype.name)
        else:
            array = (data.t() if self.source.transposed(name) else data).float().contiguous().numpy()
        rows = self.layout.rows(name, array.shape[0])
        while self._next < len(self.order) and self.order[self._next] == name:
            self.writer.write_tensor_data(array if rows is None else array[rows.numpy()])
            self._next += 1

    def __exit__(self, kind, *_: object) -> None:
        try:
            if kind is None:
                self.writer.close()
                os.replace(self.partial, self.out)
        finally:
            if self.partial.exists():
                self.partial.unlink()


def write_gguf(source: HFFolder, cfg: QuantConfig, out: Path, include: str, ignore: tuple[str, ...],
               result: PretrainedResult) -> None:
    """Write the GGUF file ``out`` with round-to-nearest codes, tensors in shard order (``Conv1D`` weights
    quantized as their transpose ``(out, in)``)."""
    with GGUFOut(source, cfg, out) as file:
        plan: list[tuple[str, Path, bool]] = []
        for shard in source.shards:
            for name, shape, floating in source.infos(shard):
                linear = shape[::-1] if source.transposed(name) else shape
                quantized = selected(name, shape, floating, include, ignore) and groups_fit(linear, cfg.weight)
                file.plan(name, shape, quantized)
                (result.quantized if quantized else result.kept).append(name)
                plan.append((name, shard, quantized))
        file.start()
        for name, shard, quantized in plan:
            tensor = source.tensor(shard, name)
            if quantized:
                tensor = quantize_weight(name, tensor.t() if source.transposed(name) else tensor, cfg.weight,
                                         torch.float16)
            file.write(name, tensor)
