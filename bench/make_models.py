"""Write the test model folders: Llama-, Qwen2-, GPT-2- and Mixtral-shaped, seeded random weights, with a word
tokenizer that loads offline (``squeezer.hf.testmodels``). Sizes: tiny / small / 1b (built by transformers)
and 7b / 13b (written one tensor at a time, fp16, larger than this machine's memory for 13b).

    python bench/make_models.py --arch llama --size 1b --out /tmp/models/llama-1b
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from squeezer.hf.testmodels import ARCHITECTURES, SIZES, make_model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    args = parser.parse_args()
    start = time.perf_counter()
    folder = make_model_folder(args.out, args.arch, args.size, args.seed, getattr(torch, args.dtype))
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.arch} {args.size}: {size / 1e9:.3f} GB of shards in {folder} "
          f"({time.perf_counter() - start:.1f} s, peak RSS {peak:.0f} MB)")


if __name__ == "__main__":
    main()
