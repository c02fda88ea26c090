"""A run folder that fills up: the checkpoint that does not fit stops every rank at once with one message
(the path, the cause, the newest complete checkpoint), and the run continues from that checkpoint."""

import shutil
import time

import pytest

from alexnet import checkpoint
from conftest import final_weights, max_diff, run_cli
from test_resume import RESUME

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("processes", [1, 2])
def test_a_checkpoint_that_does_not_fit_stops_the_run_cleanly_and_it_resumes(exact, tmp_path, small_disk,
                                                                             processes):
    flags = ["--data", exact["data"], *RESUME, "--epochs", "2", "--checkpoint-every", "2", "--dist-timeout", "60",
             *(["--nproc-per-node", "2", "--batch-size", "2"] if processes == 2 else [])]
    reference = tmp_path / "reference"
    run_cli("train", *flags, "--out", reference)
    size = checkpoint.step_path(reference / "checkpoints", 2).stat().st_size
    disk = small_disk(int(size * 1.6))  # room for one checkpoint, not for the second
    out = disk / "run"
    t0 = time.monotonic()
    p = run_cli("train", *flags, "--out", out, check=False)
    seconds = time.monotonic() - t0
    text = p.stdout + p.stderr
    assert p.returncode == 1, text[-3000:]
    assert "Traceback" not in text and "Logging error" not in text, text[-3000:]
    assert seconds < 50, f"a rank waited: {seconds:.0f} s"  # well under --dist-timeout 60 plus start-up
    newest = checkpoint.step_path(out / "checkpoints", 2)
    message = [line for line in p.stderr.splitlines() if "error:" in line][0]
    assert f"could not write the checkpoint {checkpoint.step_path(out / 'checkpoints', 4)}" in message, message
    assert "No space left on device" in message and f"the newest complete checkpoint is {newest}" in message
    assert "Make room (or move the run folder to a disk with room)" in message
    assert sorted(f.name for f in (out / "checkpoints").iterdir()) == ["last.pt", newest.name]  # no partial file
    # The earlier checkpoint is whole: moved to a disk with room, the run continues from it and ends as
    # the run that never stopped.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    resumed = run_cli("train", *flags, "--out", moved, "--resume", "auto")
    assert "(global step 2)" in resumed.stdout
    assert max_diff(final_weights(moved), final_weights(reference)) == 0.0
