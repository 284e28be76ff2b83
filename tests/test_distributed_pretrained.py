"""Data-parallel calibration of a Hugging Face folder block by block: 2 gloo processes, each with half of the
calibration samples, write what 1 process writes with all of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from squeezer.errors import ConfigError, ModelError  # noqa: E402
from squeezer.hf import quantize_pretrained  # noqa: E402
from squeezer.hf.testmodels import make_model_folder  # noqa: E402
from tests.test_sequential import _decompressed  # noqa: E402

PRESET = "w4g128-gptq"


def _calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 24), generator=gen) for _ in range(4)]


def _worker(rank: int, world: int, store: str, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        share = len(_calib()) // world
        result = quantize_pretrained(folder, PRESET, out, calib=_calib()[rank * share:(rank + 1) * share],
                                     distributed=True, max_hidden_bytes=0)  # each process spills its own
        assert result.spilled
        assert Path(out).is_dir(), "every process returns once process 0 has written the output"
        assert bool(result.quantized) == (rank == 0), "process 0 alone writes"
        with pytest.raises(ConfigError if rank == 0 else ModelError, match="input scale|process 0 failed"):
            # process 0 refuses to write AWQ's input scales: every process stops, none waits for it
            quantize_pretrained(folder, "w4g128-awq", f"{out}-awq", calib=_calib()[rank * share:(rank + 1) * share],
                                distributed=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch and transformers
def test_two_processes_write_what_one_process_writes(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "llama", "llama")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(folder), str(tmp_path / "two")), nprocs=2, join=True)
    quantize_pretrained(folder, PRESET, tmp_path / "one", calib=_calib())
    two, one = _decompressed(tmp_path / "two"), _decompressed(tmp_path / "one")
    assert two.keys() == one.keys() and len(one) == 14
    for name in one:  # the same codes and scales; the Hessian sums differ in float64 summation order only
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no spilled hidden states left behind"


def test_model_free_quantization_is_not_distributed(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "llama", "llama")
    with pytest.raises(ConfigError, match="distributed=.*pass calib"):
        quantize_pretrained(folder, "w8", tmp_path / "out", distributed=True)
