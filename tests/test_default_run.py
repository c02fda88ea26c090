"""The out-of-the-box run (`alexnet train` on the built-in dataset) must leave chance early and surely, not
by luck of the processor's rounding: its first epoch, in each precision `--precision auto` can pick on a
CPU, ends with a training loss well below ln(classes)."""

import math
import re

import pytest

from alexnet.data.synthetic import CLASSES
from alexnet.runtime import cpu_has_bf16

from conftest import run_cli

PRECISIONS = ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not cpu_has_bf16(), reason="this CPU has no bf16 in hardware (auto picks fp32 here)"))]
STEP = re.compile(r"epoch 1/\d+ (\d+)/(\d+) \| loss ([0-9.]+)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def last_third_loss(progress: str) -> float:
    """The mean training loss over the last third of epoch 1's steps, from the progress lines (--log-every
    1), which give the running mean over the epoch at each step (every batch holds as many images)."""
    running = {int(m[1]): float(m[3]) for m in STEP.finditer(progress)}
    steps = int(STEP.search(progress)[2])
    assert sorted(running) == list(range(1, steps + 1)), "a progress line per step"
    first = steps - steps // 3
    return (running[steps] * steps - running[first] * first) / (steps - first)


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_default_run_is_well_below_chance_loss_by_the_end_of_its_first_epoch(cache, tmp_path, precision):
    out = tmp_path / "run"
    proc = run_cli("train", "--epochs", "1", "--deterministic", "--precision", precision, "--log-every", "1",
                   "--out", out, env={"ALEXNET_CACHE": str(cache)})
    classes = len(CLASSES)
    loss = last_third_loss(proc.stderr)
    assert loss <= 0.9 * math.log(classes), f"{precision}: {loss:.3f} over the last third of epoch 1"
    assert "train_bn: true" in (out / "config.yaml").read_text()  # what the built-in dataset fills in shows
