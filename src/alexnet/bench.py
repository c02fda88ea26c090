"""`alexnet bench`: images per second of our training pipeline and of the reference pipeline, measured in
the same run, alternating, with medians.

Three measurements for each pipeline:
- data: the loader alone, batches taken and put on the device ready for the model;
- model: the training step alone (forward, loss, backward, optimizer step) on a batch already there;
- end to end: both, as training runs them.

The reference pipeline is the PyTorch ImageNet example's: torchvision ImageFolder with PIL,
RandomResizedCrop, RandomHorizontalFlip, ToTensor and Normalize in the loader workers, pinned memory,
fp32, NCHW, torchvision's alexnet, SGD with momentum, the loss and top-1 read every step. Ours: the
packed form with the batch augmentation, our AlexNet (the torchvision variant), --precision auto,
channels_last, fused SGD, optionally torch.compile, and our own train_one_epoch, in this process with its
allocator tuned as `alexnet train` tunes it (runtime.tune_allocator). The reference runs in a process of
its own, started fresh, as the ImageNet example runs: with glibc's allocator as it comes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from .config import IMAGENET_MEAN, IMAGENET_STD, BenchConfig, TrainConfig, validate_bench
from .data import held, packed
from .data.build import build_loaders
from .data.folder import find_classes
from .data.batch import on_device
from .data.synthetic import default_cache_dir, ensure_dataset
from .errors import BenchError, ConfigError, message
from .models import create_model
from .parallel import DataParallel
from .progress import Progress
from .runtime import configure, make_sgd, precision_warning, resolve_device, resolve_precision, tune_allocator

# torchvision's AlexNet at 224x224: 0.714 G multiply-adds forward; a trained image costs about three
# forward passes (forward, and the two products of the backward), 2 FLOP a multiply-add.
TRAIN_FLOP_PER_IMAGE_224 = 3 * 2 * 0.714e9
# Dense bf16 peak of the GPUs we quote utilisation for (the vendors' figures, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class Pipeline:
    """A loader and a training step; `batches()` is a fresh pass over the loader, `step(batch)` one
    optimizer step, `ready(batch)` the batch put on the device as the model takes it; `end_to_end(it, n)`
    n steps as training takes them from the iterator `it`; `measure(what)` images per second."""

    name: str
    cfg: BenchConfig
    device: torch.device

    def batches(self):
        raise NotImplementedError

    def ready(self, batch):
        raise NotImplementedError

    def step(self, batch) -> None:
        raise NotImplementedError

    def end_to_end(self, it, n: int) -> None:
        for _ in range(n):
            self.step(self.ready(next(it)))

    def measure(self, what: str) -> float:
        return measure(self, what, self.cfg, self.device)

    def close(self) -> None:
        pass


class Reference(Pipeline):
    name = "reference"

    def __init__(self, root: Path, cfg: BenchConfig, device: torch.device, classes: int) -> None:
        import torchvision
        from torchvision import transforms as T
        tf = T.Compose([T.RandomResizedCrop(cfg.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        dataset = torchvision.datasets.ImageFolder(str(root / "train"), tf)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                                  num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                                  drop_last=True)
        self.cfg, self.device = cfg, device
        self.model = torchvision.models.alexnet(num_classes=classes).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.criterion = nn.CrossEntropyLoss()

    def batches(self):
        return iter(self.loader)

    def ready(self, batch):
        images, target = batch
        return images.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)

    def step(self, batch) -> None:
        images, target = batch
        output = self.model(images)
        loss = self.criterion(output, target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        # the example reads the loss and top-1 each step for its meters
        loss.item(), output.argmax(1).eq(target).sum().item()


class InOwnProcess(Pipeline):
    """The reference pipeline, built and measured in a process of its own (spawned, so nothing of this
    one's set-up carries over): `measure(what)` answers with its images per second."""

    name = "reference"

    def __init__(self, root: Path, cfg: BenchConfig, device: torch.device, classes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # its loader starts workers as a script's would here (fork on Linux), not as this process was started
        self._proc = ctx.Process(target=_serve_reference, name="alexnet-bench-reference",
                                 args=(child, str(root), cfg, str(device), classes, multiprocessing.get_start_method()))
        self._proc.start()
        child.close()
        try:
            self.facts = self._answer()  # built, or the error that stopped it
        except BaseException:
            self.close()
            raise

    def _answer(self):
        # polled, so that a process that died without a word (its loader workers may hold the pipe open)
        # is noticed; a measurement itself may take minutes
        while not self._conn.poll(1.0):
            if not self._proc.is_alive():
                break
        try:
            kind, value = self._conn.recv() if self._conn.poll() else ("gone", None)
        except EOFError:
            kind, value = "gone", None
        if kind == "gone":
            self._proc.join(5)
            raise BenchError(f"the reference pipeline's process ended (exit code {self._proc.exitcode})")
        if kind == "error":
            raise BenchError(f"the reference pipeline failed: {value}")
        return value

    def measure(self, what: str) -> float:
        self._conn.send(what)
        return self._answer()

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(30)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()
        self._conn.close()


def _serve_reference(conn, root: str, cfg: BenchConfig, device: str, classes: int, start_method: str) -> None:
    """The reference's process: build it, then measure what is asked until told to stop (None)."""
    try:
        multiprocessing.set_start_method(start_method, force=True)
        configure(False, cfg.threads)
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        pipe = Reference(Path(root), cfg, dev, classes)
        conn.send(("ready", {"pid": os.getpid(), "start_method": multiprocessing.get_start_method()}))
        while (what := conn.recv()) is not None:
            conn.send(("rate", measure(pipe, what, cfg, dev)))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):  # the parent was interrupted or has gone: it says so
        pass
    except Exception as e:  # reported by the parent, which stops the bench with it
        try:
            conn.send(("error", _one_line(e)))
        except OSError:
            pass
    finally:
        conn.close()


def _one_line(e: Exception) -> str:
    """An exception as one line, its type first as a traceback names it; one re-raised from a DataLoader
    worker as the original's."""
    kind = type(e).__qualname__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__qualname__}"
    lines = [line for line in message(e).splitlines() if line.strip()]
    return f"{kind}: {lines[0].strip() if lines else ''}"


class Ours(Pipeline):
    name = "ours"

    def __init__(self, root: Path, cfg: BenchConfig, device: torch.device, classes: int, log=print) -> None:
        from .train import Schedule, Trainer
        resize = str(round(cfg.image_size * 256 / 224))
        # workers stopped after each measurement (as the reference's): none go on working in the background
        data = build_loaders(root, device, train=dict(resize=resize, crop=cfg.image_size, mean=IMAGENET_MEAN,
                                                      std=IMAGENET_STD), val=None, batch_size=cfg.batch_size,
                             eval_batch=cfg.batch_size, workers=cfg.workers, data_on_device="auto",
                             jpeg_decode=cfg.jpeg_decode,
                             persistent=False, say=log)  # held in memory as alexnet train holds it
        self.held, self.loader, self.augment = data.train_set.held, data.train, data.train_augment
        self.cfg, self.device = cfg, device
        self.raw = create_model("alexnet", classes).to(device, memory_format=torch.channels_last)
        optimizer = make_sgd(self.raw.parameters(), "auto", device, lr=0.01, momentum=0.9, weight_decay=1e-4)
        schedule = Schedule(TrainConfig(epochs=1, warmup_epochs=0, schedule="constant"), 1, 0.01)
        self.trainer = Trainer(self.raw, optimizer, schedule, nn.CrossEntropyLoss(), device, channels_last=True,
                               amp_dtype=resolve_precision(cfg.precision, device, False),
                               parallel=DataParallel(self.raw, device, compile=cfg.compile))
        self.epoch = itertools.count()

    def batches(self):
        self.loader.sampler.set_epoch(next(self.epoch))
        return iter(self.loader)

    def ready(self, batch):
        images, target, _ = on_device(batch, self.device, True, self.augment)
        return images, target

    def step(self, batch) -> None:
        self.run_steps([(batch[0], batch[1], 0)])

    def end_to_end(self, it, n: int) -> None:
        self.run_steps(_Stream(it, n))  # through our training loop, which moves and finishes the batches

    def run_steps(self, batches) -> None:
        """Our train_one_epoch over these batches (a sized iterable; it moves and finishes them itself)."""
        from .train import train_one_epoch
        train_one_epoch(self.trainer, batches, global_step=0, progress=Progress(0, "", enabled=False),
                        augment=self.augment)


class _Stream:
    """A sized view of the next `n` batches of a loader iterator, for train_one_epoch."""

    def __init__(self, it, n: int) -> None:
        self.it, self.n = it, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(self.it, self.n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(pipe: Pipeline):
    while True:
        yield from pipe.batches()


def measure(pipe: Pipeline, what: str, cfg: BenchConfig, device: torch.device) -> float:
    """Images per second over `steps` batches after `warmup` ones, from a fresh pass over the loader."""
    n, warm = cfg.steps, cfg.warmup
    if what == "model":
        batch = pipe.ready(next(pipe.batches()))
        for _ in range(max(warm, 1)):
            pipe.step(batch)
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            pipe.step(batch)
        _sync(device)
        return n * cfg.batch_size / (time.perf_counter() - start)
    it = _endless(pipe)
    if what == "data":
        for _ in range(warm):
            pipe.ready(next(it))
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            pipe.ready(next(it))
        _sync(device)
        return n * cfg.batch_size / (time.perf_counter() - start)
    if warm:
        pipe.end_to_end(it, warm)
    _sync(device)
    start = time.perf_counter()
    pipe.end_to_end(it, n)
    _sync(device)
    return n * cfg.batch_size / (time.perf_counter() - start)


def profile(pipe: Ours, cfg: BenchConfig, device: torch.device, folder: Path, log) -> str:
    """`steps` end-to-end steps of our pipeline under torch.profiler: a Chrome trace (open it in
    chrome://tracing or Perfetto) and a table of the operations that took the most time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    folder.mkdir(exist_ok=True)  # its parent was checked at start (config.validate_bench)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    it = _endless(pipe)
    pipe.run_steps(_Stream(it, max(cfg.warmup, 1)))
    with torch_profile(activities=activities) as prof:
        pipe.run_steps(_Stream(it, cfg.steps))
        _sync(device)
    trace = folder / "trace.json"
    prof.export_chrome_trace(str(trace))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=20)
    (folder / "top-ops.txt").write_text(table + "\n")
    log(f"profile of {cfg.steps} end-to-end steps: {trace}, the top operations in {folder / 'top-ops.txt'}")
    return str(trace)


def packed_for(source: Path, resize: str, given: str | None, log) -> Path:
    """The packed form of `source` at `resize`: `given`, or one made once in the cache folder."""
    if given:
        return Path(given)
    key = hashlib.sha256(f"{source.resolve()}|{resize}".encode()).hexdigest()[:12]
    out = default_cache_dir() / "packed" / f"{source.name}-{resize}-{key}"
    return packed.pack(source, out, resize, workers=2, log=log)


def run(cfg: BenchConfig, log=print) -> dict:
    validate_bench(cfg)
    tune_allocator()  # ours as `alexnet train` runs it; the reference's own process keeps the default
    threads = configure(False, cfg.threads)
    device = resolve_device(cfg.device)
    if cfg.jpeg_decode == "device" and device.type != "cuda":  # as eval and train refuse it
        raise ConfigError(f"--jpeg-decode device decodes on a GPU; this bench runs on {device.type}: use auto or workers")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    source = Path(cfg.data) if cfg.data else ensure_dataset(log=log)
    if packed.is_packed(source):
        raise ConfigError(f"--data {source}: give the ImageFolder (the reference pipeline reads its JPEGs); "
                          f"the packed form goes to --packed")
    resize = str(round(cfg.image_size * 256 / 224))
    class_names = find_classes(source / "train", hold_out=False)
    images = sum(len(files) for _, _, files in os.walk(source / "train"))
    if images < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size}: {source / 'train'} has only {images} files")
    if images > 100_000 and not cfg.packed:
        raise ConfigError(f"{source / 'train'} has {images} files: pack it first (`alexnet data pack {source} "
                          f"OUT --resize {resize}`, once) and pass --packed OUT")
    if cfg.packed:
        if not packed.is_packed(cfg.packed):
            raise ConfigError(f"--packed {cfg.packed} is not a packed dataset (make one with alexnet data pack)")
        if packed.read_meta(cfg.packed)["classes"] != class_names:
            raise ConfigError(f"--packed {cfg.packed} is not a packed form of {source} (its classes differ)")
    classes = len(class_names)
    pipes = []
    try:
        for name in cfg.pipelines:
            if name == "ours":
                pipes.append(Ours(packed_for(source, resize, cfg.packed, log), cfg, device, classes, log))
            else:
                pipes.append(InOwnProcess(source, cfg, device, classes))
        return _run(cfg, pipes, device, threads, source, resize, log)
    finally:
        for pipe in pipes:
            pipe.close()
        held.release()


def _run(cfg: BenchConfig, pipes: list, device: torch.device, threads: int, source: Path, resize: str, log) -> dict:
    amp = resolve_precision(cfg.precision, device, False)
    log(f"bench on {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"{threads} threads, {cfg.workers} loader workers: batch {cfg.batch_size}, {cfg.image_size}x{cfg.image_size} "
        f"crops of images resized to {resize} px, from {source}; ours: {'fp32' if amp is None else str(amp).split('.')[-1]}, "
        f"channels_last{', compiled' if cfg.compile else ''}"
        f"{_held_words(device) if any(getattr(p, 'held', False) for p in pipes) else ''}; "
        f"reference: fp32, NCHW; {cfg.rounds} round{'s' * (cfg.rounds != 1)} of {cfg.steps} "
        f"step{'s' * (cfg.steps != 1)} after {cfg.warmup}, alternating")
    if warning := precision_warning(amp, device):
        log(f"WARNING: {warning}")
    rates = {(p.name, w): [] for p in pipes for w in cfg.what}
    for r in range(cfg.rounds):
        for what in cfg.what:
            for pipe in (pipes if r % 2 == 0 else pipes[::-1]):  # alternate who goes first
                rate = pipe.measure(what)
                rates[(pipe.name, what)].append(rate)
                log(f"round {r + 1}/{cfg.rounds}: {pipe.name:9s} {what:10s} {rate:9.1f} img/s")
    result = {"device": str(device), "batch_size": cfg.batch_size, "image_size": cfg.image_size,
              "rounds": cfg.rounds, "steps": cfg.steps,
              "median": {f"{p}/{w}": statistics.median(v) for (p, w), v in rates.items()},
              "all": {f"{p}/{w}": v for (p, w), v in rates.items()}}
    med = result["median"]
    ratios = {}
    if "ours/end-to-end" in med and "reference/end-to-end" in med:
        ratios["end-to-end ours / reference"] = med["ours/end-to-end"] / med["reference/end-to-end"]
    for p in ("ours", "reference"):
        if f"{p}/end-to-end" in med and f"{p}/model" in med:
            ratios[f"{p} end-to-end / own model step"] = med[f"{p}/end-to-end"] / med[f"{p}/model"]
    result["ratios"] = ratios
    if device.type == "cuda" and "ours/end-to-end" in med:
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        flop = TRAIN_FLOP_PER_IMAGE_224 * (cfg.image_size / 224) ** 2
        if peak:
            result["mfu"] = med["ours/end-to-end"] * flop / peak
    ours = next((p for p in pipes if p.name == "ours"), None)
    if cfg.profile and ours is not None:
        result["profile"] = profile(ours, cfg, device, Path(cfg.profile), log)
    if cfg.json:
        print(json.dumps(result))
    else:
        print(f"{'median img/s':24s}" + "".join(f"{w:>12s}" for w in cfg.what))
        for p in pipes:
            print(f"{p.name:24s}" + "".join(f"{med[f'{p.name}/{w}']:12.1f}" for w in cfg.what))
        for k, v in ratios.items():
            print(f"{k}: {v:.2f}x")
        if "mfu" in result:
            print(f"model FLOP utilisation (ours, end to end): {result['mfu']:.1%} of the bf16 peak")
    return result


def _held_words(device: torch.device) -> str:
    if device.type == "cpu":
        return ", crops read from the memory map by the main process"
    return f", packed images held in {'GPU' if device.type == 'cuda' else device.type} memory"
