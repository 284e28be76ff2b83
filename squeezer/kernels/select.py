"""Choose an execution path per linear layer and rows bucket.

Rows ``m`` fall in buckets (1, 2-16, 17-128, >128), each represented by one size. Only paths
that reproduce the layer's quantization for that size are candidates
(:meth:`~squeezer.kernels.base.KernelPath.eligible`). Three ways to choose among them:

* :func:`rule_choice` (deterministic, no timing): the first eligible path of :func:`rule_order`
  (fbgemm's dynamic int8 GEMM, then ``_int_mm``, the weight-only int8 / int4 kernels, the fp32
  fallback last), except that weight-only int8 on more than 128 rows of a layer with fewer than
  :data:`SMALL_LAYER` weights runs ``dequant_matmul`` (one fp32 GEMM of the unpacked weight beats
  the bf16 int8 kernel there). These are the choices timing made on a quiet machine (MiniLM's
  384 / 1536 layers and 1024-4096 wide MLPs, every preset). On a CPU without VNNI (AVX2 only),
  ``_int_mm`` is PyTorch's reference loop (a 4096 x 4096 layer: 152 ms per row against 80 ms for
  ``dequant_matmul`` and 3.5 ms for fp32, measured on an AVX2 EPYC), so the rule ranks it last there
  (:func:`rule_order`) and symmetric int8 activations run ``int8_codes_bf16`` (0.95 ms per row).
* :func:`timed_choice`: every eligible path timed in interleaved rounds (median per path), and
  the rule's path kept unless another is faster by more than :data:`MARGIN` (a timing on a busy
  machine can be off by a factor 2.7: one noisy run must not decide). The result is cached on disk
  (:func:`squeezer.cache.cache_dir` ``("kernels")``) under a key of the torch version, threads,
  eligible paths, the layer's whole scheme (:func:`scheme_key`), ``(N, K)`` and the bucket.
* :func:`pinned_choice`: the path(s) the caller names, refused when a path cannot run the layer.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..cache import cache_dir, key_hash, read_entry, write_entry
from ..errors import ConfigError
from ..quant.formats import unsupported_format
from .base import KernelPath, LinearProblem, supported_formats

BUCKETS: tuple[tuple[int, int], ...] = ((1, 1), (16, 8), (128, 64), (1 << 62, 256))
"""(largest m in the bucket, m that represents it)."""
RULE_ORDER = ("fbgemm_dynamic", "int_mm", "int8_weight_bf16", "int8_codes_bf16", "int4_weight_bf16", "dequant_matmul")
"""Paths by preference of the rule on a CPU with VNNI; a path not listed comes after these."""


def rule_order() -> tuple[str, ...]:
    """:data:`RULE_ORDER`, with ``int_mm`` last on a CPU without VNNI (its slow reference loop)."""
    if torch.cpu._is_vnni_supported():
        return RULE_ORDER
    return tuple(n for n in RULE_ORDER if n != "int_mm") + ("int_mm",)
SMALL_LAYER = 1 << 21
"""Weights (N K) under which the fp32 fallback beats the weight-only int8 kernel for m > 128."""
MARGIN = 0.2
"""Relative speed-up another path needs over the rule's path before timing picks it."""
REPEATS = 7


def bucket_of(m: int) -> int:
    """Index of the bucket that holds ``m`` rows."""
    return 0 if m == 1 else 1 if m <= 16 else 2 if m <= 128 else 3


def bucket_label(bucket: int) -> str:
    """``m<=1``, ``m<=16``, ``m<=128``, ``m>128``."""
    top = BUCKETS[bucket][0]
    return f"m<={top}" if top < BUCKETS[-1][0] else f"m>{BUCKETS[-2][0]}"


def scheme_key(problem: LinearProblem) -> dict[str, Any]:
    """The layer's whole quantization scheme as plain data: weight and activation specs, mode, observer."""
    return problem.scheme.to_dict()


def eligible_paths(problem: LinearProblem, paths: Sequence[KernelPath], bucket: int) -> list[KernelPath]:
    """The ``paths`` that reproduce the layer's quantization on ``bucket``'s representative rows."""
    return [p for p in paths if p.eligible(problem, BUCKETS[bucket][1])]


def rule_choice(problem: LinearProblem, paths: Sequence[KernelPath], bucket: int) -> str:
    """The rule's path for ``bucket`` (module docstring): a function of the format and shape only.
    Some path must be eligible (:meth:`PackedLinear.build` checks it first)."""
    names = [p.name for p in eligible_paths(problem, paths, bucket)]
    small = problem.out_features * problem.in_features < SMALL_LAYER
    if "int8_weight_bf16" in names and "dequant_matmul" in names and small and bucket == len(BUCKETS) - 1:
        return "dequant_matmul"
    order = rule_order()
    rank = {name: i for i, name in enumerate(order)}
    return min(names, key=lambda name: rank.get(name, len(order)))


def time_paths(paths: Sequence[KernelPath], states: dict[str, Any], x: torch.Tensor,
               repeats: int = REPEATS) -> dict[str, float]:
    """Median seconds per path over ``repeats`` rounds, each round running every path once in turn
    (a burst of load then hits all of them alike), after two warm-up calls each."""
    times: dict[str, list[float]] = {p.name: [] for p in paths}
    with torch.no_grad():
        for p in paths:
            for _ in range(2):
                p.run(states[p.name], x)
        for _ in range(repeats):
            for p in paths:
                start = time.perf_counter()
                p.run(states[p.name], x)
                times[p.name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def timed_choice(problem: LinearProblem, paths: Sequence[KernelPath]) -> list[str]:
    """One path per bucket: the rule's unless another eligible path times more than
    :data:`MARGIN` faster; each bucket's result cached on disk (module docstring)."""
    directory = cache_dir("kernels")
    states: dict[str, Any] = {}
    choice = []
    for bucket, (_, m) in enumerate(BUCKETS):
        rule = rule_choice(problem, paths, bucket)
        eligible = eligible_paths(problem, paths, bucket)
        names = [p.name for p in eligible]
        if len(eligible) == 1:
            choice.append(rule)
            continue
        parts = {"torch": torch.__version__, "threads": torch.get_num_threads(), "paths": names,
                 "scheme": scheme_key(problem), "shape": [problem.out_features, problem.in_features], "bucket": bucket}
        key = key_hash(parts)
        cached = read_entry(directory, key)
        if isinstance(cached, dict) and cached.get("path") in names:
            choice.append(cached["path"])
            continue
        for p in eligible:
            if p.name not in states:
                states[p.name] = p.prepare(problem)
        seconds = time_paths(eligible, states, torch.randn(m, problem.in_features))
        fastest = min(seconds, key=seconds.get)
        name = fastest if seconds[fastest] < (1 - MARGIN) * seconds[rule] else rule
        write_entry(directory, key, {"key": parts, "path": name, "seconds": seconds})
        choice.append(name)
    return choice


def pinned_choice(layer: str, problem: LinearProblem, paths: Sequence[KernelPath], pin: str | Sequence[str]) -> list[str]:
    """``pin`` (one path name for every bucket, or one per bucket) checked against what each path can run."""
    names = [pin] * len(BUCKETS) if isinstance(pin, str) else list(pin)
    if len(names) != len(BUCKETS) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"kernels[{layer!r}] must be a path name or a list of {len(BUCKETS)} (one per rows bucket "
                          f"{', '.join(bucket_label(b) for b in range(len(BUCKETS)))}), got {pin!r}")
    by_name = {p.name: p for p in paths}
    for bucket, name in enumerate(names):
        if name not in by_name:
            raise ConfigError(f"kernels[{layer!r}]: unknown kernel path {name!r}; valid: {', '.join(by_name)}")
        if not by_name[name].supports(problem.format):
            raise unsupported_format(f"kernel path {name!r}", layer, problem.format.name,
                                     supported_formats([by_name[name]]), problem.weight.spec.describe())
        if not by_name[name].eligible(problem, BUCKETS[bucket][1]):
            able = ", ".join(p.name for p in eligible_paths(problem, paths, bucket))
            raise ConfigError(f"kernels[{layer!r}]: path {name!r} does not support layer {layer!r} "
                              f"({problem.weight.spec.describe()} weights, {problem.scheme.activation_mode} activations, "
                              f"{problem.out_features}x{problem.in_features}) for {bucket_label(bucket)} rows; "
                              f"it can run: {able}")
    return names
