"""One error hierarchy: every error fruitnet expects carries the exit code the CLI returns for it.

`cli.main` catches FruitnetError once and prints `fruitnet COMMAND: error: MESSAGE`; anything
else is a bug and keeps its traceback.  Exit codes: 1 the job failed or some inputs could not be
used, 2 unusable arguments or data.
"""

from __future__ import annotations


class FruitnetError(Exception):
    """Base of every expected error; str(error) is the one line the user sees."""

    exit_code = 2


class UsageError(FruitnetError, ValueError):
    """An argument that cannot be used (a device that is not there, a flag that conflicts)."""


class DataError(FruitnetError, ValueError):
    """The data cannot be used at all (missing folder, fewer than two classes, an empty class)."""


class ModelFileError(FruitnetError, ValueError):
    """A model file that cannot be used; the message names the file and the reason."""


class WeightsUnavailable(FruitnetError, RuntimeError):
    """Pretrained weights could not be found or fetched; the message says what to do."""


class ExportError(FruitnetError, RuntimeError):
    """The export failed or did not match the PyTorch model; the message says how."""

    exit_code = 1


class ImageError(FruitnetError):
    """A file that cannot be used as an image; ``str(err) == f"{path}: {reason}"``.

    Per-file: commands report it beside the file and carry on with the others (exit code 1).
    """

    exit_code = 1

    def __init__(self, path, reason: str):
        super().__init__(str(path), reason)  # both in args so the error pickles across processes
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
