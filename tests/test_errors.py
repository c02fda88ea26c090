"""Errors raised in a DataLoader worker come back as their own message, in one line; running out of
memory is one line too."""
import os
import subprocess
import sys

import pytest
import torch

from alexnet.bench import _one_line
from alexnet.errors import DataError, message
from alexnet.runtime import out_of_memory
from conftest import TINY


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise DataError(f"image {i} does not decode: run alexnet data check")


def _raised_by_a_worker() -> Exception:
    loader = torch.utils.data.DataLoader(_Broken(), batch_size=2, num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    return caught.value


def test_a_worker_error_is_its_original_message():
    e = _raised_by_a_worker()
    assert "Traceback" in str(e)  # what the loader raises again in the main process
    assert message(e) == "image 0 does not decode: run alexnet data check"
    assert _one_line(e) == "alexnet.errors.DataError: image 0 does not decode: run alexnet data check"


def test_other_errors_are_kept_and_shortened_to_their_first_line():
    assert message(ValueError("plain")) == "plain"
    assert _one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert _one_line(RuntimeError()) == "RuntimeError: "


def _limited_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (32 << 30, 32 << 30))  # refused at once, whatever the overcommit policy


def test_a_model_too_big_for_memory_is_one_line_not_a_traceback(tiny_data, tmp_path):
    """--fc-width 10000000 asks for 343 GiB: the allocator's error used to end a traceback."""
    args = ["train", "--data", tiny_data, "--out", tmp_path / "r", *TINY[:-1], "--fc-width", "10000000"]
    proc = subprocess.run([sys.executable, "-m", "alexnet", *map(str, args)], capture_output=True, text=True,
                          timeout=120, preexec_fn=_limited_memory, env={**os.environ, "ALEXNET_CACHE": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "alexnet train: error: out of memory (it asked for 343.3 GiB more): lower --batch-size (--accum-steps "
        "keeps the global batch), --crop or --fc-width"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("text,said", [
    ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
     "allocate 368640000000 bytes. Error code 12 (Cannot allocate memory)", " (it asked for 343.3 GiB more)"),
    ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB",
     " (it asked for 20.00 GiB more)"),
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4096 bytes.", " (it asked for 4.0 KiB more)"),
    ("out of memory", ""),
    ("shape '[-1, 3]' is invalid for input of size 100000", None),
])
def test_out_of_memory_is_told_from_other_errors(text, said):
    assert out_of_memory(RuntimeError(text)) == said
    assert out_of_memory(MemoryError()) == ""  # Python's own (numpy, PIL): one line too
