"""GPU paths, run where CUDA is present (skipped elsewhere; CI has no GPU)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY, shas

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_one_gpu_nccl_run_through_torchrun(tiny_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "alexnet",
           "train", "--data", str(tiny_data), "--out", str(out), *TINY, "--epochs", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on cuda:0" in p.stdout and "backend nccl" in p.stdout
    assert (out / "checkpoints" / "last.pt").is_file() and shas(p.stdout)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_nccl_agree(tiny_data, tmp_path):
    cmd = [sys.executable, "-m", "alexnet", "train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), *TINY,
           "--batch-size", "4", "--nproc-per-node", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "backend nccl" in p.stdout
    ranks = shas(p.stdout)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
