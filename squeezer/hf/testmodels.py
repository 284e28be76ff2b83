"""Hugging Face model folders made by code: Llama-, Qwen2-, GPT-2- and Mixtral-shaped decoders from
transformers configs with seeded random weights, and a word-level tokenizer that loads offline.

The tokenizer's vocabulary is :data:`WORDS` plus ``w<i>`` fillers up to the model's vocabulary size, so a
text written with those words tokenises to known ids (``AutoTokenizer.from_pretrained(folder)``; transformers maps
the ``qwen2`` model type to its own tokenizer class, which does not read this one)."""

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

ARCHITECTURES = ("llama", "qwen2", "gpt2", "mixtral")


def _config(arch: str, size: dict[str, int]):
    import transformers

    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=size["hidden_size"], n_inner=size["intermediate_size"],
                                       n_layer=size["num_hidden_layers"], n_head=size["num_attention_heads"],
                                       vocab_size=size["vocab_size"], n_positions=512, bos_token_id=0, eos_token_id=0)
    if arch == "mixtral":
        return transformers.MixtralConfig(**size, num_local_experts=4, num_experts_per_tok=2)
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


def make_model_folder(folder: str | Path, arch: str = "llama", size: str = "tiny", seed: int = 0,
                      dtype: torch.dtype = torch.float32, max_shard_size: str = "2GB") -> Path:
    """Write a ``arch``-shaped model of ``size`` (:data:`SIZES`) with weights drawn from ``seed`` to ``folder``:
    config, safetensors shards (split at ``max_shard_size``) and the word tokenizer. Returns ``folder``.
    Sizes in :data:`STREAMED_SIZES` go through :func:`write_random_folder`."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ConfigError(f"architecture {excerpt(arch)} is not made here; choose from {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise ConfigError(f"size {excerpt(size)} is not known; choose from {', '.join(SIZES)}")
    folder = Path(folder)
    if size in STREAMED_SIZES:
        return write_random_folder(folder, arch, size, seed, dtype)
    torch.manual_seed(seed)
    config = _config(arch, SIZES[size])
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    word_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


def write_random_folder(folder: Path, arch: str, size: str, seed: int = 0, dtype: torch.dtype = torch.float16,
                        shard_bytes: int = 2 << 30) -> Path:
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
    word_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder
