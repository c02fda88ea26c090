"""Errors raised in a DataLoader worker come back as their own message, in one line."""
import pytest
import torch

from alexnet.bench import _one_line
from alexnet.errors import DataError, message


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
