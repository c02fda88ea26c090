"""Checkpoints: atomic save, safe load (weights_only), and reading weights for fine-tuning."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

FORMAT_VERSION = 1


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, flushed and fsynced,
    then renamed over the target, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path in the target's folder (same suffix); when the block succeeds, give it an
    ordinary file's permissions and rename it over the target, so no reader sees a half-written file. For
    exports, figures and reports; checkpoints also fsync (save)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # not mkstemp's private 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def not_a_file(path: Path) -> str:
    """What is wrong with a checkpoint's path that is not a file, and which file to give instead."""
    if not path.exists():
        return f"{path} does not exist"
    if (path / "checkpoints").is_dir() or path.name == "checkpoints" and any(path.glob("*.pt")):
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        return (f"{path} is a {'run' if folder != path else 'checkpoint'} folder: give one of its files, "
                f"{folder / 'best.pt'} (the best validation top-1) or {folder / 'last.pt'} (the newest)")
    return f"{path} is a folder, not a checkpoint file"


def load(path: str | Path) -> dict[str, Any]:
    """Load a file with `weights_only=True`: tensors and plain types only, never arbitrary code. A file that
    is not a PyTorch file (empty, text, an image), a damaged one and one that holds other objects each get
    one message; none suggests loading unsafely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(not_a_file(path))
    if exported := exported_kind(path):
        raise CheckpointError(f"{path} is {EXPORTED_AS[exported]}, not a checkpoint: `alexnet predict` takes it; "
                              f"eval, export and --resume take a checkpoint written by `alexnet train` (RUN/checkpoints/"
                              f"last.pt or best.pt), and --weights that or a state_dict saved by torch.save")
    if what := _not_a_torch_file(path):
        raise CheckpointError(f"{path} is not a checkpoint: it is {what}. Give a .pt file written by "
                              "`alexnet train` (RUN/checkpoints/last.pt or best.pt) or by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text goes on to advise weights_only=False: never repeated
        raise CheckpointError(f"{path} holds objects other than tensors and plain types, so it was not loaded "
                              "(loading it could run code); checkpoints of this tool hold only tensors and "
                              "plain values") from None
    except Exception as e:  # a damaged file raises whatever its first bad byte leads to (EOFError, KeyError, ...)
        raise CheckpointError(f"{path} could not be read (truncated or not a PyTorch file): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"BM": "a BMP image",
          b"RIFF": "a RIFF file (WebP image, WAV sound)", b"\x1f\x8b": "a gzip file", b"%PDF": "a PDF document"}
EXPORTED_AS = {"onnx": "an ONNX model", "torchscript": "a TorchScript model", "pt2": "a torch.export program (.pt2)",
                "safetensors": "a safetensors file (weights alone, without the run's classes and settings)"}


def exported_kind(path: str | Path) -> str | None:
    """Which of export's formats (onnx, torchscript, pt2, safetensors) the file at `path` is in, by its
    content: a model written by `alexnet export` or by torch, whatever its name; else None."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x08" and head[2:3] == b"\x12":  # protobuf: ir_version, then producer_name
        return "onnx"
    if len(head) > 9 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"  # the length of its JSON header, then the header
    if head.startswith(b"PK\x03\x04"):
        import zipfile
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return None  # let torch.load say what is wrong with it
        parts = {part for name in names for part in name.split("/")[1:2]}  # under the archive's own folder
        if "code" in parts or "constants.pkl" in parts:
            return "torchscript"
        if "archive_format" in parts or "models" in parts or "serialized_exported_program.json" in names:
            return "pt2"  # torch 2.6 on, and before (its files at the top)
    return None


def _not_a_torch_file(path: Path) -> str | None:
    """What `path` is when it is clearly not a torch.save file (a zip archive, or a pickle in the legacy
    format), else None."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty (0 bytes)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip, or a pickle (legacy)
        return None
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            return what
    for cut in range(4):  # the 512 bytes may end inside a character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None  # unknown binary: let torch.load say what it finds
    if all(c.isprintable() or c in "\n\r\t" for c in text):
        return f"a text file (it begins {text.strip()[:40]!r})"
    return None


def load_run(path: str | Path) -> dict[str, Any]:
    """Load one of our checkpoints, checking that it is one."""
    state = load(path)
    if not isinstance(state, dict) or "format_version" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this tool (it lacks format_version and model): "
                              "give one written by `alexnet train` (RUN/checkpoints/last.pt or best.pt); to "
                              "start training from plain weights (a state_dict), give them to train's --weights")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state['format_version']}; this version reads "
                              f"up to {FORMAT_VERSION}: upgrade the package")
    return state


def weights_from(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint of ours or in a plain state_dict file (torchvision's)."""
    state = load(path)
    if isinstance(state, dict) and "format_version" in state and "model" in state:
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is neither a checkpoint of ours nor a state_dict of tensors")
    return state


# ------------------------------------------------------------------------------- run folders and resume

STEP_GLOB = "step-*.pt"


def step_path(folder: str | Path, global_step: int) -> Path:
    return Path(folder) / f"step-{global_step:09d}.pt"


def save_step(state: dict[str, Any], folder: str | Path, keep_last: int) -> Path:
    """Save `state` as step-<global step>.pt, point last.pt at it (a hard link, renamed into place) and
    delete the oldest step files beyond `keep_last`. best.pt is never deleted here."""
    folder = Path(folder)
    path = step_path(folder, state["global_step"])
    save(state, path)
    point(folder / "last.pt", path, state)
    for old in sorted(folder.glob(STEP_GLOB))[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def newest_step(folder: str | Path) -> Path | None:
    """The newest step-N.pt in `folder` (by name), or None; complete, since save() renames it into place."""
    steps = sorted(Path(folder).glob(STEP_GLOB))
    return steps[-1] if steps else None


def point(name: Path, path: Path, state: dict[str, Any]) -> None:
    """Make `name` (last.pt, best.pt) the checkpoint at `path`, which holds `state`: a hard link renamed into
    place, so the same step costs its bytes once on disk; a copy where the file system has no hard links."""
    tmp = name.parent / f".{name.name}.{os.getpid()}.tmp"
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(path, tmp)
        os.replace(tmp, name)
    except OSError:  # a file system without hard links
        save(state, name)


def unusable(folder: str | Path) -> list[str]:
    """The names of the checkpoint files in `folder` (step files, last.pt, best.pt): where newest_valid found
    none that loads, those that failed (and a best.pt, which it does not continue from)."""
    folder = Path(folder)
    return sorted(p.name for p in folder.glob(STEP_GLOB)) + [n for n in ("last.pt", "best.pt") if (folder / n).is_file()]


def newest_valid(folder: str | Path, log=None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `folder` that loads, with its state; a file that fails to load (truncated,
    corrupt) is reported and the one before it is tried. None when there is none."""
    folder = Path(folder)
    candidates = sorted(folder.glob(STEP_GLOB), reverse=True)
    if not candidates and (folder / "last.pt").is_file():
        candidates = [folder / "last.pt"]
    for path in candidates:
        try:
            return path, load_run(path)
        except CheckpointError as e:
            if log:
                log(f"WARNING: skipping an unusable checkpoint: {e}")
    return None
