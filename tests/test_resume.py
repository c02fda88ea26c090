"""Checkpoints and resume: exact resume inside an epoch (one and two processes), --resume auto with
unusable checkpoints, retention, SIGTERM, elastic restarts after a killed worker, and refusing a
checkpoint that would run code."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from alexnet import checkpoint
from conftest import TINY, final_weights, max_diff, run_cli, run_here, write_folder

# Deterministic, with dropout on (so the random state matters), 24 images in batches of 4: 6 steps an epoch.
RESUME = ["--resize", "72", "--crop", "64", "--fc-width", "32", "--batch-size", "4", "--workers", "0", "--quiet",
          "--deterministic", "--dropout", "0.5", "--lr", "0.03", "--keep-last", "100"]


def steps_of(out: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))


def resume_from(exact, src: Path, name: str, *flags, edit=None):
    """Copy one step checkpoint into a fresh run folder and continue from it with --resume auto."""
    out = exact["root"] / name
    (out / "checkpoints").mkdir(parents=True)
    state = checkpoint.load_run(src)
    if edit:
        edit(state)
    torch.save(state, out / "checkpoints" / src.name)
    run = run_cli if "--nproc-per-node" in flags else run_here
    p = run("train", "--data", exact["data"], "--out", out, *RESUME, *flags, "--resume", "auto")
    return final_weights(out), p


@pytest.fixture(scope="module")
def straight(exact):
    """A run never stopped: 2 epochs (12 steps), a checkpoint every 2 steps."""
    out = exact["root"] / "straight"
    run_here("train", "--data", exact["data"], "--out", out, *RESUME, "--epochs", "2", "--checkpoint-every", "2")
    return out


@pytest.mark.slow
def test_resume_inside_an_epoch_gives_the_same_weights(exact, straight):
    assert steps_of(straight) == [2, 4, 6, 8, 10, 12]
    src = straight / "checkpoints" / "step-000000008.pt"  # epoch 2, after 2 of its 6 steps
    state = checkpoint.load_run(src)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 8)
    w, p = resume_from(exact, src, "resumed", "--epochs", "2", "--checkpoint-every", "2")
    assert "at epoch 2, step 2 of it" in p.stdout
    assert max_diff(w, final_weights(straight)) == 0.0
    # The control: the same checkpoint, claiming to be one step earlier in the epoch, repeats a batch.
    w, _ = resume_from(exact, src, "control", "--epochs", "2", edit=lambda s: s.update(step_in_epoch=1))
    assert max_diff(w, final_weights(straight)) > 1e-6


def test_an_epoch_recorded_but_not_checkpointed_is_recorded_once_after_the_resume(exact, tmp_path):
    # What a run killed between epoch 2's metrics line and its checkpoint leaves: the line, and no step-12.pt.
    out = tmp_path / "run"
    run_here("train", "--data", exact["data"], "--out", out, *RESUME, "--epochs", "2")
    ckpts = out / "checkpoints"
    (ckpts / "last.pt").unlink()
    checkpoint.step_path(ckpts, 12).unlink()
    os.link(checkpoint.step_path(ckpts, 6), ckpts / "last.pt")
    epochs = lambda: [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs() == [1, 2]
    p = run_here("train", "--data", exact["data"], "--out", out, *RESUME, "--epochs", "3", "--resume", "auto")
    assert "1 line(s) of epochs after the checkpoint's (epoch 1) removed" in p.stdout
    assert epochs() == [1, 2, 3]


@pytest.mark.slow
def test_resume_with_the_other_memory_layout(exact, straight):
    """A channels_last run (fused SGD) resumed with --no-channels-last: its momentum buffers are stored
    channels_last, its parameters are now NCHW; the rest of the run must still equal the straight one up to
    rounding. (Fused SGD on CPUs reads all of them in memory order: unmatched layouts mix up elements.)"""
    src = straight / "checkpoints" / "step-000000008.pt"
    state = checkpoint.load_run(src)
    conv = state["optimizer"]["state"][0]["momentum_buffer"]
    assert conv.dim() == 4 and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    w, _ = resume_from(exact, src, "other-layout", "--epochs", "2", "--no-channels-last", "--sgd", "fused")
    moved = max_diff(final_weights(straight), state["model"])
    assert max_diff(w, final_weights(straight)) <= 1e-4 * moved


@pytest.mark.slow
def test_two_processes_resume_inside_an_epoch_exactly(exact):
    out = exact["root"] / "straight2"
    run_cli("train", "--data", exact["data"], "--out", out, *RESUME, "--epochs", "1", "--checkpoint-every", "1",
            "--batch-size", "2", "--nproc-per-node", "2")  # 6 steps; step 4 is inside the epoch
    state = checkpoint.load_run(out / "checkpoints" / "step-000000004.pt")
    assert len(state["ranks"]) == 2 and state["world_size"] == 2
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    w, _ = resume_from(exact, out / "checkpoints" / "step-000000004.pt", "resumed2", "--epochs", "1",
                       "--batch-size", "2", "--nproc-per-node", "2")
    assert max_diff(w, final_weights(out)) == 0.0
    # On another world size it still runs, with a warning that it is not exact.
    _, p = resume_from(exact, out / "checkpoints" / "step-000000004.pt", "resumed1", "--epochs", "1",
                       "--batch-size", "4")
    assert "is not bit-exact" in p.stdout


@pytest.mark.parametrize("batch,again", [(8, 0), (6, 2)])
def test_resume_inside_an_epoch_with_another_batch_goes_on_after_the_images_trained_on(exact, straight, tmp_path,
                                                                                      batch, again):
    """Stopped 2 steps of 4 images into epoch 2, the run continued with another batch size takes the epoch's
    images from the 9th on (the epoch's order is the same whatever the batch); where 8 images are not whole
    steps of the new batch, the part of a step is trained on again, and said. Before, the steps were kept
    and the images were not: with a larger batch some were never trained on, with a smaller one some twice."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step-000000008.pt", out / "checkpoints")
    full = tmp_path / "full"
    run_here("train", "--data", exact["data"], "--out", tmp_path / "straight", *RESUME, "--epochs", "2",
             env={"ALEXNET_TRACE_SAMPLES": str(full)})
    order = (full / "rank0-epoch1.txt").read_text().split()
    trace = tmp_path / "trace"
    p = run_here("train", "--data", exact["data"], "--out", out, *RESUME, "--epochs", "2", "--resume", "auto",
                 "--batch-size", batch, env={"ALEXNET_TRACE_SAMPLES": str(trace)})
    assert (trace / "rank0-epoch1.txt").read_text().split() == order[8 - again:]
    said = f"the epoch goes on after {8 - again} of them, so {again} are seen again"
    assert (said in p.stdout) == bool(again), p.stdout


@pytest.mark.slow
def test_resume_auto_skips_an_unusable_checkpoint_and_keeps_the_last_k(exact, straight, tmp_path):
    out = tmp_path / "auto"
    p = run_here("train", "--data", exact["data"], "--out", out, *RESUME, "--epochs", "1", "--resume", "auto",
                 "--checkpoint-every", "1", "--keep-last", "2")
    assert "starting afresh" in p.stdout
    assert steps_of(out) == [5, 6]  # the last 2 kept
    assert os.path.samefile(out / "checkpoints" / "last.pt", out / "checkpoints" / "step-000000006.pt")
    newest = out / "checkpoints" / "step-000000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    p = run_here("train", "--data", exact["data"], "--out", out, *RESUME, "--epochs", "2", "--resume", "auto")
    assert "skipping an unusable checkpoint" in p.stdout and "step-000000006.pt" in p.stdout
    assert "at epoch 1, step 5 of it" in p.stdout
    # When none is usable, the run is refused and the folder left as it was: starting afresh would replace
    # the run's record and checkpoints.
    for step in (out / "checkpoints").glob("step-*.pt"):
        step.write_bytes(step.read_bytes()[:1000])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    p = run_here("train", "--data", exact["data"], "--out", out, *RESUME, "--epochs", "3", "--resume", "auto",
                 check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "holds checkpoints, but none that the run can continue from" in p.stderr
    assert "step-000000011.pt, step-000000012.pt, last.pt" in p.stderr and "starting afresh" not in p.stdout
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp") / f"alexnet-evil-{uuid.uuid4().hex}"


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, exact):
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError):  # the control: a plain load would have run it
        torch.load(evil, weights_only=True)
    for args in (["eval", "--checkpoint", evil], ["predict", "--checkpoint", evil, evil],
                 ["train", "--data", exact["data"], "--resume", evil, "--out", tmp_path / "r"],
                 ["train", "--data", exact["data"], "--weights", evil, "--out", tmp_path / "w", "--epochs", "1"]):
        p = run_here(*args, check=False)
        assert p.returncode == 2, p.stderr
        assert "loading it could run code" in p.stderr and "Traceback" not in p.stderr
        assert "weights_only" not in p.stderr  # torch's advice to load unsafely is never passed on
    assert not MARKER.exists()


@pytest.mark.slow
def test_resume_inside_an_epoch_mixes_the_same(exact):
    """Mixup and CutMix draw from (seed, rank, step): resumed inside an epoch, the run mixes as it would
    have and ends with the same weights."""
    mixing = ["--epochs", "2", "--checkpoint-every", "2", "--mixup", "0.4", "--cutmix", "1"]
    out = exact["root"] / "mixed-straight"
    run_here("train", "--data", exact["data"], "--out", out, *RESUME, *mixing)
    w, _ = resume_from(exact, out / "checkpoints" / "step-000000008.pt", "mixed-resumed", *mixing)
    assert max_diff(w, final_weights(out)) == 0.0


def signal_after_epoch_2(flags: list, out: Path, sig=signal.SIGTERM, stderr=subprocess.PIPE) -> tuple[int, str, str | None]:
    """`alexnet train FLAGS --out OUT` (12 epochs) sent `sig` once its second epoch has ended: SIGTERM to
    the process, as a scheduler preempts a job; SIGINT to its whole process group, as Ctrl-C in a terminal
    reaches every process of the foreground job (loader workers too). (exit code, stdout, stderr; with
    stderr=STDOUT, both in stdout)."""
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", "train", *map(str, flags), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # wait for the second epoch to end, then preempt
        if "epoch 2/12:" in line:
            break
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_at_a_step_saves_and_resume_auto_finishes_the_same(exact, tmp_path, sig):
    # Ctrl-C (SIGINT) reaches the loader workers too (--workers 2): they leave it to the main process.
    flags = [*RESUME, "--epochs", "12", "--data", exact["data"], *(["--workers", "2"] if sig == signal.SIGINT else [])]
    reference = tmp_path / "reference"
    run_cli("train", *flags, "--out", reference)
    out = tmp_path / "preempted"
    returncode, stdout, stderr = signal_after_epoch_2(flags, out, sig)
    assert returncode == 0, stderr
    assert f"stopped on {sig.name}" in stdout and "--resume auto" in stdout and "Traceback" not in stderr
    stopped_at = checkpoint.load_run(out / "checkpoints" / "last.pt")["global_step"]
    assert 12 <= stopped_at < 72
    resumed = run_cli("train", *flags, "--out", out, "--resume", "auto")
    assert f"step {stopped_at % 6} of it (global step {stopped_at})" in resumed.stdout  # inside that epoch
    assert max_diff(final_weights(out), final_weights(reference)) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_to_the_launcher_of_two_processes_stops_them_saved_without_a_traceback(exact, tmp_path, sig):
    """What a scheduler or `timeout` (SIGTERM to the `alexnet train` launcher), Ctrl-C (SIGINT to its
    process group) or a closed terminal (SIGHUP) does to a multi-process run: the workers are sent SIGTERM
    (torch's agent passes a SIGTERM or SIGHUP on; the launcher turns a Ctrl-C into a SIGTERM), stop at a
    step and save; the launcher says so,
    without a traceback, and exits as a signalled process does (128 + the signal); resuming finishes as
    the uninterrupted run."""
    flags = [*RESUME, "--epochs", "12", "--data", exact["data"], "--batch-size", "2", "--nproc-per-node", "2"]
    reference = tmp_path / "reference2"
    run_cli("train", *flags, "--out", reference)
    out = tmp_path / "preempted2"
    returncode, output, _ = signal_after_epoch_2(flags, out, sig, stderr=subprocess.STDOUT)
    assert returncode == 128 + sig, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    if sig == signal.SIGINT:
        assert "alexnet train: Ctrl-C: the workers stop at their next step and save a checkpoint" in output
        assert "alexnet train: stopped by Ctrl-C (SIGINT); the workers were sent SIGTERM" in output
    else:
        assert f"alexnet train: stopped by {sig.name}; the workers were sent it too (a training run stops" in output
    name = "SIGTERM" if sig == signal.SIGINT else sig.name
    stopped_at = int(output.split(f"stopped on {name} at global step ")[1].split(",")[0])
    assert checkpoint.load_run(out / "checkpoints" / "last.pt")["global_step"] == stopped_at
    assert 12 <= stopped_at < 72
    resumed = run_cli("train", *flags, "--out", out, "--resume", "auto")
    assert f"step {stopped_at % 6} of it (global step {stopped_at})" in resumed.stdout
    assert max_diff(final_weights(out), final_weights(reference)) == 0.0


def dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.slow
def test_a_second_ctrl_c_stops_the_workers_at_once(exact, tmp_path):
    """After the first Ctrl-C the launcher waits for its workers to stop at a step and save; a worker that
    cannot (here: frozen inside a step) is not waited for after a second Ctrl-C: the launcher kills the
    workers and exits at once, without a traceback."""
    tag = uuid.uuid4().hex
    flags = [*RESUME, "--epochs", "12", "--data", exact["data"], "--batch-size", "2", "--nproc-per-node", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", "train", *map(str, flags), "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "ALEXNET_TEST_TAG": tag})
    for line in proc.stdout:
        if "epoch 2/12:" in line:
            break
    workers = [worker_pid(tag, rank) for rank in (0, 1)]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
    time.sleep(3)
    assert proc.poll() is None, "the launcher waits for its workers after the first Ctrl-C"
    os.killpg(proc.pid, signal.SIGINT)
    started = time.monotonic()
    output, _ = proc.communicate(timeout=20)
    assert time.monotonic() - started < 10, output[-3000:]
    assert proc.returncode == 130, output[-3000:]
    assert "Ctrl-C again stops them at once" in output and "stopped at once by a second Ctrl-C" in output
    assert "Traceback" not in output, output[-3000:]
    assert all(dead(pid) for pid in workers)


@pytest.mark.slow
def test_a_killed_worker_restarts_and_resumes(exact, tmp_path):
    tag = uuid.uuid4().hex
    out = tmp_path / "elastic"
    flags = [*RESUME, "--epochs", "6", "--data", exact["data"], "--batch-size", "2", "--checkpoint-every", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", "train", *map(str, flags), "--out", str(out),
                             "--nproc-per-node", "2", "--max-restarts", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "ALEXNET_TEST_TAG": tag})
    deadline = time.monotonic() + 120
    while not ((out / "checkpoints").exists() and max(steps_of(out), default=0) >= 8):  # inside epoch 2
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.1)
    victim = worker_pid(tag, rank=1)
    killed_after = max(steps_of(out))
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout
    resumed_at = int(stdout.split("(global step ")[1].split(")")[0])
    assert killed_after <= resumed_at + 2 and resumed_at >= 8  # at most one checkpoint interval repeated
    assert checkpoint.load_run(out / "checkpoints" / "last.pt")["global_step"] == 36  # 6 epochs x 6 steps


def worker_pid(tag: str, rank: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"ALEXNET_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} found")


def test_non_finite_losses_are_skipped_then_stop_the_run_with_a_usable_checkpoint(exact, tmp_path):
    out = tmp_path / "diverged"
    p = run_here("train", "--data", exact["data"], "--out", out, *RESUME, "--epochs", "3", "--lr", "1e6",
                 "--max-nonfinite-steps", "3", check=False)
    assert p.returncode == 1, p.stderr
    assert "the loss was not finite for 3 steps in a row" in p.stderr and "Traceback" not in p.stderr
    state = checkpoint.load_run(out / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    # The control: a sane learning rate skips nothing.
    run_here("train", "--data", exact["data"], "--out", tmp_path / "sane", *RESUME, "--epochs", "1")
    import json
    assert json.loads((tmp_path / "sane" / "metrics.jsonl").read_text())["skipped_steps"] == 0


def test_a_run_resumed_on_changed_data_says_how_it_changed(tmp_path):
    """The checkpoint records what its data was (counts and a hash of the files' names and labels, not
    read again; a pack's recorded fingerprint): a resume on the same data says nothing, also from the
    files where the run read a pack (which leaves out the unreadable file the folder counts); one on
    changed data, or on a validation split chosen otherwise, warns and says which."""
    src = write_folder(tmp_path / "src", classes=3, train_per_class=4, val_per_class=2)
    (src / "train" / "ring" / "broken.jpg").write_bytes(b"not an image")
    out, flags = tmp_path / "run", ["--data", src, *RESUME, "--cache-dir", tmp_path / "cache"]
    run_here("train", *flags, "--out", out, "--epochs", "1")
    assert "WARNING: the data" not in run_here("train", *flags, "--out", out, "--resume", "auto", "--epochs", "2").stdout
    p = run_here("train", *flags, "--out", out, "--resume", "auto", "--epochs", "3", "--pack", "no")
    assert "WARNING: the data" not in p.stdout and "training from the pack" not in p.stdout
    first = sorted((src / "train" / "circle").iterdir())[0]
    first.rename(first.with_name("renamed.jpg"))  # the files, read as they are: the same count, another name
    p = run_here("train", *flags, "--out", out, "--resume", "auto", "--epochs", "4", "--pack", "no")
    assert f"WARNING: the data differs from {out / 'checkpoints'}" in p.stdout
    assert "'s: the same number of training images, but other files (names or labels); " \
           f"{src} changed since {out / 'checkpoints'}" in p.stdout
    (src / "val" / "ring" / "extra.jpg").write_bytes(first.with_name("renamed.jpg").read_bytes())
    p = run_here("train", *flags, "--out", out, "--resume", "auto", "--epochs", "5", "--pack", "no")
    assert "'s: 7 validation images where it had 6; " in p.stdout and "training images" not in p.stdout
    flat = tmp_path / "flat"
    shutil.copytree(src / "train", flat)
    flags = ["--data", flat, *RESUME, "--val-fraction", "0.25"]
    run_here("train", *flags, "--out", tmp_path / "held", "--epochs", "1")
    p = run_here("train", *flags, "--out", tmp_path / "held", "--resume", "auto", "--epochs", "2", "--split-seed", "1")
    assert "; the validation split is chosen otherwise now (--split-seed)" in p.stdout


@pytest.mark.parametrize("batch,said", [
    (["--global-batch-size", "16"], "the global batch is 16 now (it was 8), the peak learning rate 0.01 "
                                    "(--global-batch-size sets it)"),
    (["--global-batch-size", "8"], "the global batch is 8 as before, the peak learning rate 0.01 "
                                   "(--global-batch-size keeps it)"),
    ([], "the global batch is 16 now (it was 8), the peak learning rate 0.01 (--batch-size is per process)"),
])
def test_a_resume_on_another_number_of_processes_says_what_the_global_batch_became(tiny_data, tmp_path, batch, said):
    """--global-batch-size 16 from a run of 8 was said "(--global-batch-size keeps the global batch)"."""
    out = tmp_path / "r"
    run_here("train", "--data", tiny_data, "--out", out, *TINY)
    at = TINY.index("--batch-size")
    flags = TINY[:at] + TINY[at + 2:] if batch else TINY  # the per-process batch of 8 left to the checkpoint
    p = run_cli("train", "--data", tiny_data, "--out", out, *flags, "--epochs", "2", "--resume", "auto",
                "--nproc-per-node", "2", *batch)
    assert f"the world size changed from 1 to 2 processes: {said}" in p.stdout + p.stderr, p.stdout + p.stderr
