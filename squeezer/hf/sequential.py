"""Calibrated quantization of a Hugging Face folder, one transformer block in memory at a time.

The model is built without weights (:mod:`.skeleton`); the parameters registered before the blocks (the
embeddings) are read from the shards and the calibration batches run until the first block, whose inputs are
captured (hidden states ``(B, T, H)`` and the keyword arguments it takes: attention mask, position
embeddings, ...; the same for every block). Then for block ``i``: its weights are read, it is quantized by
:func:`squeezer.quantize` on those inputs as one stage (its layers' statistics gathered in one pass, as the
in-memory pipeline does for each child of a model's block list; no error measurement, so the passes over the
inputs are that one, the static presets' range pass, and a mixture-of-experts block's token count), its outputs
*from the quantized block* become block ``i + 1``'s inputs, its tensors are written out and the block is dropped.
With ``distributed``, each process runs its share of the samples and the statistics are combined per block.
Hidden states are kept for one depth (:class:`.hidden.HiddenStore`: a block's inputs and outputs, spilled to
disk when together above ``max_hidden_bytes``; the keyword arguments stay in memory).
Tensors outside the blocks (embeddings, final norm, ``lm_head``) are written as they are stored: the
preset applies to the blocks' Linear layers (in GGUF, to those whose rows split into its blocks of 32).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..api import quantize
from ..config import QuantConfig
from ..distributed import Reducer, make_reducer
from ..errors import ConfigError, ModelError
from ..io.atomic import atomic_directory
from ..memory import release_free_memory
from ..modules import quant_layers
from ..modules.base import QuantMixin
from ..quant.core import QParams, QTensor
from .block_checkpoint import BlockCheckpointWriter
from .compressed import CompressedWriter
from .folder import HFFolder, PretrainedResult
from .gguf_file import GGUFOut
from .hidden import HiddenStore
from .moe import Expert, expert_tokens
from .skeleton import BlockStage, Skeleton
from .weights import groups_fit


class _Captured(Exception):
    pass


def _by_name(block: nn.Module, args: tuple, kw: dict) -> dict:
    """A block call's arguments by parameter name (positional ones named; ``**kwargs`` spread out), the first
    one under ``hidden_states``."""
    signature = inspect.signature(block.forward)
    bound = signature.bind(*args, **kw).arguments
    named: dict = {}
    for i, (name, value) in enumerate(bound.items()):
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named["hidden_states" if i == 0 else name] = value
    return named


def capture_inputs(skeleton: Skeleton, batches: list[Tensor], max_hidden_bytes: int,
                   spill_dir: Path) -> tuple[HiddenStore, list[dict]]:
    """Block 0's inputs on each batch of token ids: hidden states (a store) and keyword arguments."""
    hidden: list[Tensor] = []
    kwargs: list[dict] = []

    def stop(block: nn.Module, args: tuple, kw: dict) -> None:
        named = _by_name(block, args, kw)
        hidden.append(named.pop("hidden_states"))
        kwargs.append({k: v for k, v in named.items() if v is not None})
        raise _Captured

    handle = skeleton.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    store = None
    try:
        for j, ids in enumerate(batches):
            try:
                with torch.no_grad():
                    skeleton.model(input_ids=ids)
            except _Captured:
                pass
            if not hidden:
                raise ModelError(f"{skeleton.source.path}: the model's forward never reached its first block "
                                 f"{skeleton.prefix}.0")
            if store is None:
                shapes = [(*b.shape, hidden[0].shape[-1]) for b in batches]
                store = HiddenStore(shapes, max_hidden_bytes // 2, spill_dir)
            store[j] = hidden.pop()
    finally:
        handle.remove()
    return store, kwargs


def _codes(name: str, layer: QuantMixin, scale_dtype: torch.dtype | None) -> QTensor:
    """The layer's codes; with ``scale_dtype`` its scales rounded to that storage dtype (codes unchanged)."""
    if layer.input_scale is not None or layer.input_rotation > 1:
        raise ConfigError(f"layer {name!r} carries an input scale or rotation (AWQ, SmoothQuant, Hadamard) that "
                          "this output format cannot hold; use a preset without it")
    qt = layer.weight_qtensor()
    if scale_dtype is None:
        return qt
    qp = qt.qparams
    return QTensor(qt.codes, QParams(qp.scale.to(scale_dtype).float(), qp.zero_point), qt.spec)


class _Sink:
    """Where the quantized tensors go: a compressed-tensors folder, a GGUF file or squeezer's block checkpoints,
    opened in ``output`` (closing it without error commits ``out``)."""

    def __init__(self, skeleton: Skeleton, cfg: QuantConfig, output: ExitStack, out: Path, format: str,
                 result: PretrainedResult) -> None:
        self.skeleton, self.cfg, self.result, self.format = skeleton, cfg, result, format
        source = skeleton.source
        if format == "gguf":
            self.file = output.enter_context(GGUFOut(source, cfg, out))
            names = [n for i in range(len(skeleton.blocks)) for n in skeleton.block_names(i)]
            for name in names + skeleton.outside_names():
                shape = source.infos_of(skeleton.shard_of[name], name)[0]
                self.file.plan(name, shape, self._planned(name, shape))
            self.file.start()
            return
        tmp = output.enter_context(atomic_directory(out))
        if format == "squeezer":
            self.file = BlockCheckpointWriter(tmp, cfg.name)
        else:
            self.file = CompressedWriter(source, cfg, tmp)

    def _planned(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether the stored weight ``name`` of ``shape`` goes out as codes (a ``Conv1D``'s shape is transposed)."""
        linear = shape[::-1] if self.skeleton.source.transposed(name) else shape
        return name in self.skeleton.linear_weights and groups_fit(linear, self.cfg.weight)

    def block(self, i: int, stage: BlockStage) -> None:
        """Write block ``i``: its quantized Linear weights as codes, every other tensor as stored."""
        sk = self.skeleton
        layers = {sk.stored_name(f"{sk.prefix}.{i}.{n.removeprefix('block.')}.weight"): l
                  for n, l in quant_layers(stage).items()}
        if self.format == "squeezer":
            self.file.block(i, stage)
            for name in sk.block_names(i):
                (self.result.quantized if name in layers else self.result.kept).append(name)
            return
        if self.format != "gguf":
            self.file.shard(f"model-block-{i:05d}.safetensors")
        for name in sk.block_names(i):
            layer = layers.get(name)
            self._write(name, layer)

    def outside(self) -> None:
        if self.format == "compressed-tensors":
            self.file.shard("model-outside-blocks.safetensors")
        for name in self.skeleton.outside_names():
            self._write(name, None)

    def _write(self, name: str, layer: QuantMixin | None) -> None:
        source = self.skeleton.source
        shard = self.skeleton.shard_of[name]
        if self.format == "gguf":
            planned = self._planned(name, source.infos_of(shard, name)[0])
            if planned and layer is None:
                raise ModelError(f"weight {name!r} was not quantized (no Linear layer of the preset); "
                                 "the GGUF output needs its codes")
            self.file.write(name, _codes(name, layer, torch.float16) if planned else source.tensor(shard, name))
        elif layer is not None:
            shape = tuple(layer.weight.shape)
            if not groups_fit(shape, self.cfg.weight):
                raise ConfigError(f"layer {name!r}: its {shape[-1]} input features do not split into groups of "
                                  f"{self.cfg.weight.granularity.describe()}, which compressed-tensors needs")
            self.file.add_quantized(name.removesuffix(".weight"), _codes(name, layer, None), torch.float32)
        else:
            self.file.add_kept(name, source.tensor(shard, name))
        (self.result.quantized if layer is not None else self.result.kept).append(name)

    def close(self) -> None:
        """Write the tensors outside the blocks, then the output's index and config."""
        self.outside()
        self.finish()

    def finish(self) -> None:
        if self.format == "squeezer":
            self.file.finish(self.skeleton.source, self.skeleton.prefix)
        elif self.format != "gguf":
            self.file.finish(self.skeleton.source)


def _live_blocks(blocks: nn.ModuleList) -> int:
    return sum(any(not p.is_meta for p in b.parameters()) for b in blocks)


def quantize_sequential(source: HFFolder, cfg: QuantConfig, batches: list[Tensor], out: Path, format: str,
                        result: PretrainedResult, max_hidden_bytes: int, min_expert_tokens: int,
                        distributed: bool | Any = False) -> PretrainedResult:
    """Quantize ``source`` with ``cfg`` on token batches ``(B, T)``, block by block, into ``out`` (see module).
    ``distributed`` (``True`` or a process group, as :func:`squeezer.quantize` takes it): ``batches`` are this
    process's share; each block's statistics and expert token counts are combined over the processes, so every
    process quantizes each block identically; process 0 alone writes ``out``, and every process returns once it
    is committed (the others' ``result`` lists no written tensor), or raises once its opening, a write or its
    commit failed."""
    reducer = make_reducer(distributed)
    skeleton = Skeleton.build(source)
    spill_dir = out.parent / (f".{out.name}.hidden-{reducer.rank}" if reducer.active else f".{out.name}.hidden")
    stores: list[HiddenStore] = []
    try:
        skeleton.load_outside(torch.float32, before_blocks=True)
        inputs, kwargs = capture_inputs(skeleton, batches, max_hidden_bytes, spill_dir)
        stores.append(inputs)
        skeleton.unload(skeleton.model)
        outputs = HiddenStore(inputs.shapes, max_hidden_bytes // 2, spill_dir)
        stores.append(outputs)
        result.spilled = inputs.spilled
        with ExitStack() as output:  # left by an error: the partial output is removed, nothing committed
            open_sink = None if reducer.rank != 0 else partial(_Sink, skeleton, cfg, output, out, format, result)
            _run(skeleton, cfg, inputs, outputs, kwargs, open_sink, result=result,
                 min_expert_tokens=min_expert_tokens, reducer=reducer)
            committed = output.pop_all()
        _together(reducer, None if reducer.rank != 0 else committed.close)
    finally:
        for store in stores:
            store.close()
        if spill_dir.exists() and not any(spill_dir.iterdir()):
            spill_dir.rmdir()
    return result


def _together(reducer: Reducer, step: Callable[[], Any] | None) -> Any:
    """``step()`` where there is one (process 0's opening, writes and commit of the output; ``None`` elsewhere),
    then every process learns whether it failed: its error is raised there and a :class:`ModelError` on the
    others, so that none waits for a collective that will not come."""
    error, value = None, None
    try:
        value = None if step is None else step()
    except Exception as exc:  # re-raised below, once every process knows
        error = exc
    failed = reducer.max(torch.tensor([float(error is not None)])).item() > 0
    if error is not None:
        raise error
    if failed:
        raise ModelError("process 0 failed to write the output (its error says why); this process stops with it")
    return value


def _run(skeleton: Skeleton, cfg: QuantConfig, inputs: HiddenStore, outputs: HiddenStore, kwargs: list[dict],
         make_sink: Callable[[], _Sink] | None, result: PretrainedResult, min_expert_tokens: int,
         reducer: Reducer) -> None:
    """Each block in turn: quantized on ``inputs``, its outputs into ``outputs`` (the next block's inputs), written
    to the sink ``make_sink()`` opens (``None``: a process that writes nothing)."""
    sink = _together(reducer, make_sink)
    for i, block in enumerate(skeleton.blocks):
        skeleton.load(block, f"{skeleton.prefix}.{i}", torch.float32)
        result.peak_live_blocks = max(result.peak_live_blocks, _live_blocks(skeleton.blocks))
        stage = BlockStage(block).eval()
        calib = [{"hidden_states": inputs[j], **kwargs[j]} for j in range(len(inputs))]
        _quantize_block(stage, cfg, calib, min_expert_tokens, skeleton.float_linears(i), reducer,
                        lambda n: result.rtn_fallback.append(f"{skeleton.prefix}.{i}.{n}"))
        result.float_routers += [n for n in skeleton.block_names(i) if skeleton.source.router(n)]
        with torch.no_grad():
            for j, batch in enumerate(calib):
                outputs[j] = stage(**batch)
        _together(reducer, None if sink is None else partial(sink.block, i, stage))
        skeleton.release(i)
        del block, stage, calib
        release_free_memory()
        inputs, outputs = outputs, inputs
    _together(reducer, None if sink is None else sink.close)


def _quantize_block(stage: BlockStage, cfg: QuantConfig, calib: list[dict], min_expert_tokens: int,
                    keep_float: list[str], reducer: Reducer, fallback: Callable[[str], None]) -> None:
    """:func:`squeezer.quantize` of one block on its inputs, without error measurement (``measure=False``: the
    passes over ``calib`` are the statistics, and the activation ranges of static presets) and without batch-norm
    folding (a transformer block has none: no graph trace); the Linear layers ``keep_float`` (names in the block:
    routers) stay float. Experts that receive fewer than ``min_expert_tokens``
    calibration tokens (summed over ``reducer``'s processes) are left out of it and quantized with
    round-to-nearest on the same grid (each one reported to ``fallback`` by its name in the block)."""
    def run() -> None:
        with torch.no_grad():
            for batch in calib:
                stage(**batch)

    counts = expert_tokens(stage.block, run, reducer) if any(isinstance(m, Expert) for m in stage.modules()) else {}
    few = [name for name, count in counts.items() if count < min_expert_tokens]
    ignore = (*(rf"^block\.{re.escape(name)}\." for name in few),
              *(rf"^block\.{re.escape(name)}$" for name in keep_float))
    quantize(stage, replace(cfg, ignore=(*cfg.ignore, *ignore)), calib=calib, inplace=True, progress=False,
             fold_bn=False, distributed=reducer, measure=False)
    rtn = replace(cfg, algorithm="rtn", algorithm_options={})
    for name in few:
        quantize(stage.block.get_submodule(name), rtn, inplace=True, progress=False)
        fallback(name)
