"""Hugging Face model folders made by code: Llama-, Qwen2-, GPT-2-, Mixtral- and Qwen2-MoE-shaped decoders from
transformers configs with seeded random weights, and a tokenizer that loads offline (:data:`TOKENIZERS`).

The word-level tokenizer's vocabulary is :data:`WORDS` plus ``w<i>`` fillers up to the model's vocabulary size,
so a text written with those words tokenises to known ids (``AutoTokenizer.from_pretrained(folder)``;
transformers maps the ``qwen2`` model type to its own tokenizer class, which does not read this one). The
byte-level BPE tokenizer (GPT-2's scheme, with merges) is the one llama.cpp accepts in a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, excerpt

WORDS = ("the", "a", "model", "weights", "are", "quantized", "one", "block", "at", "time", "with", "calibration",
         "text", "and", "of", "to", "in", "memory", "disk", "layer", "is", "small", "fast", "data")
SPECIALS = ("[UNK]", "[PAD]")

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256},
    "small": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab_size": 1024},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40, "vocab_size": 32000},
}
"""Shapes by name: ``1b`` is TinyLlama's, ``7b`` / ``13b`` Llama-2's."""
STREAMED_SIZES = ("7b", "13b")
"""Sizes written one tensor at a time (:func:`write_random_folder`): larger than this machine's memory."""

ARCHITECTURES = ("llama", "qwen2", "gpt2", "mixtral", "qwen2_moe")


def _config(arch: str, size: dict[str, int]):
    import transformers

    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=size["hidden_size"], n_inner=size["intermediate_size"],
                                       n_layer=size["num_hidden_layers"], n_head=size["num_attention_heads"],
                                       vocab_size=size["vocab_size"], n_positions=512, bos_token_id=0, eos_token_id=0)
    if arch == "mixtral":
        return transformers.MixtralConfig(**size, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":  # routed experts half the dense width, one shared expert of the full width
        return transformers.Qwen2MoeConfig(**size, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=size["intermediate_size"] // 2,
                                           shared_expert_intermediate_size=size["intermediate_size"])
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    return config_class(**size)


def word_tokenizer(vocab_size: int):
    """A ``PreTrainedTokenizerFast`` splitting on whitespace and punctuation, one id per word of the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, *WORDS]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(vocab_size - len(words))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


def bpe_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (GPT-2's pre-tokenizer and byte-to-character map) of at most
    ``vocab_size`` tokens: ``<|endoftext|>`` (id 0, beginning / end / unknown), the characters of the bytes of
    printable ASCII, ``\\n`` and U+010A (whose UTF-8 bytes llama.cpp's loader tokenises to find the newline
    token), then merges learned from 400 lines of :data:`WORDS` drawn from ``seed``."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = byte_level.pre_tokenize_str("".join(map(chr, range(32, 127))) + "\n\u010a")
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer, tokenizer.decoder = byte_level, decoders.ByteLevel()
    end = "<|endoftext|>"
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[end], show_progress=False,
                                  initial_alphabet=sorted(set("".join(piece for piece, _ in alphabet))))
    tokenizer.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=end, eos_token=end, unk_token=end)


TOKENIZERS = {"word": word_tokenizer, "bpe": bpe_tokenizer}
"""Tokenizers by name, each made from the model's vocabulary size."""


def make_model_folder(folder: str | Path, arch: str = "llama", size: str = "tiny", seed: int = 0,
                      dtype: torch.dtype = torch.float32, max_shard_size: str = "2GB",
                      tokenizer: str = "word", initializer_range: float = 0.02) -> Path:
    """Write a ``arch``-shaped model of ``size`` (:data:`SIZES`) with weights drawn from ``seed`` to ``folder``:
    config, safetensors shards (split at ``max_shard_size``) and the ``tokenizer`` (:data:`TOKENIZERS`). Returns
    ``folder``. Matrices are drawn from ``N(0, initializer_range^2)`` (transformers' initialisation): at 0.02
    attention is nearly uniform, at 0.1 it follows the query-key products. Sizes in :data:`STREAMED_SIZES` go
    through :func:`write_random_folder` (at 0.02 only: another ``initializer_range`` is a ConfigError)."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ConfigError(f"architecture {excerpt(arch)} is not made here; choose from {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise ConfigError(f"size {excerpt(size)} is not known; choose from {', '.join(SIZES)}")
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"tokenizer {excerpt(tokenizer)} is not made here; choose from {', '.join(TOKENIZERS)}")
    folder = Path(folder)
    if size in STREAMED_SIZES:
        if initializer_range != 0.02:
            raise ConfigError(f"size {size!r} is written tensor by tensor at initializer_range 0.02; "
                              f"initializer_range={initializer_range} is not supported there")
        return write_random_folder(folder, arch, size, seed, dtype, tokenizer=tokenizer)
    torch.manual_seed(seed)
    config = _config(arch, SIZES[size])
    config.initializer_range = initializer_range
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    TOKENIZERS[tokenizer](config.vocab_size).save_pretrained(folder)
    return folder


def write_random_folder(folder: Path, arch: str, size: str, seed: int = 0, dtype: torch.dtype = torch.float16,
                        shard_bytes: int = 2 << 30, tokenizer: str = "word") -> Path:
    """A model folder written one tensor at a time, whatever its size: shapes from the weightless skeleton, each
    weight drawn from ``N(0, 0.02^2)`` (norm weights 1) with its own seed and appended to a shard of at most
    ``shard_bytes``; memory holds one tensor. Llama and Qwen2 only (their module names are the stored names)."""
    import json

    import transformers

    from .skeleton import meta_parameters
    from .stream import SafetensorsStream

    if arch not in ("llama", "qwen2"):
        raise ConfigError(f"architecture {excerpt(arch)} is not written tensor by tensor; choose llama or qwen2")
    config = _config(arch, SIZES[size])
    config.torch_dtype = str(dtype).removeprefix("torch.")
    with meta_parameters():
        model = transformers.AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    writer, written, shards = None, 0, 0
    for i, (name, param) in enumerate(model.named_parameters()):
        nbytes = param.numel() * dtype.itemsize
        if writer is None or written + nbytes > shard_bytes:
            if writer is not None:
                writer.close()
            shards += 1
            writer, written = SafetensorsStream(folder / f"model-{shards:05d}.safetensors"), 0
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        tensor = (torch.ones(param.shape) if param.dim() == 1
                  else torch.randn(param.shape, generator=gen).mul_(0.02)).to(dtype)
        writer.add(name, tensor)
        weight_map[name] = writer.path.name
        written += nbytes
        del tensor
    writer.close()
    config.save_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    TOKENIZERS[tokenizer](config.vocab_size).save_pretrained(folder)
    return folder
