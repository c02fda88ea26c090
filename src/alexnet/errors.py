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
