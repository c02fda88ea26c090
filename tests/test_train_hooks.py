"""train.hooks: checkpoints inside epochs (every N steps or minutes), the agreed stop on SIGTERM."""

import signal
import time

from alexnet.logs import Scalars
from alexnet.train.hooks import Hooks
from alexnet.train.state import TrainState


def hooks(every: str, steps_per_epoch: int = 5, global_step: int = 0):
    saves = []
    state = TrainState(global_step=global_step)
    h = Hooks(state, checkpoint_every=every, log_every=1, steps_per_epoch=steps_per_epoch, world=1,
              save=lambda epoch, in_epoch, sums: saves.append((epoch, in_epoch, state.global_step)),
              scalars=Scalars(None), lr=lambda: 0.1)
    return h, state, saves


SUMS = {"loss_sum": 1.0, "correct": 1, "images": 2}


def test_every_n_steps_inside_the_epoch_not_at_its_end():
    h, state, saves = hooks("2")
    try:
        h.start_epoch(0, skip=0)
        assert [h.after_step(s, SUMS) for s in range(1, 6)] == [False] * 5
        assert saves == [(0, 2, 2), (0, 4, 4)] and state.global_step == 5  # step 5 ends the epoch: saved there
    finally:
        h.close()


def test_a_resumed_epoch_counts_its_steps_from_where_it_was():
    h, state, saves = hooks("3", steps_per_epoch=6, global_step=10)
    try:
        h.start_epoch(2, skip=2)  # 2 of epoch 3's steps were done before global step 10
        for s in range(11, 15):
            h.after_step(s, SUMS)
        # global step 12, the epoch's 4th, is a multiple of 3; 14, its 6th, ends it (saved there, not here)
        assert h.in_epoch(14) == 6 and saves == [(2, 4, 12)]
    finally:
        h.close()


def test_every_few_minutes():
    h, state, saves = hooks("0.002m")  # 0.12 s
    try:
        h.start_epoch(0, skip=0)
        h.after_step(1, SUMS)
        time.sleep(0.2)
        h.after_step(2, SUMS)
        h.after_step(3, SUMS)  # the clock started again at the save
        assert saves == [(0, 2, 2)]
    finally:
        h.close()


def test_sigterm_stops_at_the_next_step_with_a_checkpoint():
    previous = signal.getsignal(signal.SIGTERM)
    h, state, saves = hooks("0")
    try:
        h.start_epoch(0, skip=0)
        assert h.after_step(1, SUMS) is False and saves == []
        signal.raise_signal(signal.SIGTERM)
        assert h.after_step(2, SUMS) is True and saves == [(0, 2, 2)]
    finally:
        h.close()
    assert signal.getsignal(signal.SIGTERM) == previous  # given back at the end of the run


def test_a_write_that_fails_says_what_to_do_for_its_cause(tmp_path):
    """The advice follows the cause: room for a full disk, permission for a folder that is not writable."""
    import errno
    import os
    from types import SimpleNamespace

    import pytest
    from alexnet.errors import WriteError
    from alexnet.train.hooks import written
    plan = SimpleNamespace(main=True, ckpt_dir=tmp_path / "checkpoints", out=tmp_path)
    path = tmp_path / "checkpoints" / "step-000000004.pt"
    for number, fix in ((errno.ENOSPC, "Make room (or move the run folder to a disk with room) and continue with"),
                        (errno.EACCES, f"Give yourself permission to write in {path.parent} (or move the run folder) "
                                       f"and continue with"),
                        (errno.EIO, "Fix the cause and continue with")):
        def write():
            raise RuntimeError("torch.save failed") from OSError(number, os.strerror(number), str(path))
        with pytest.raises(WriteError) as e:
            written("the checkpoint", path, write, plan)
        assert f"could not write the checkpoint {path}: " in str(e.value) and fix in str(e.value), str(e.value)
        assert f"(errno {number})" in str(e.value) and ("Make room" in str(e.value)) == (number == errno.ENOSPC)

