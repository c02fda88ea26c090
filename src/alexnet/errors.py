"""Every exception type that the `alexnet` command turns into a one-line message. Imports nothing of ours,
so that any module can raise these without importing another's machinery.

Exit codes (cli.main): 2 for what the user can fix in the command or the files it names (ConfigError,
DataError, CheckpointError), 1 for what went wrong while running (the others)."""


class ConfigError(ValueError):
    """An invalid setting; the message names it and says what is allowed."""


class DataError(ValueError):
    """A dataset folder, packed dataset or image that cannot be used; the message says which and why."""


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message says which and why."""


class DistributedError(RuntimeError):
    """A process group that could not be set up or a peer that could not be reached."""


class WriteError(RuntimeError):
    """A file of the run folder (checkpoint, metrics, report) could not be written: which, why, and the
    newest complete checkpoint to continue from."""


class NonFiniteLoss(RuntimeError):
    """The loss was not finite for too many steps in a row."""


class ExportError(RuntimeError):
    """The model could not be written in the format asked for, or the written file did not check out."""


class BenchError(Exception):
    """The reference pipeline's process failed or ended."""


def message(e: Exception) -> str:
    """The exception's message; for one that a DataLoader worker raised, which the loader raises again in
    the main process as "Caught X in DataLoader worker process 0. Original Traceback (...): ... X: message",
    the original message alone."""
    text = str(e)
    if "in DataLoader worker process" not in text or "Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    name = f"{type(e).__module__}.{type(e).__name__}: "
    return last[len(name):] if last.startswith(name) else last
