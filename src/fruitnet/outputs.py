"""What fruitnet writes: where (every output path is checked here before any work starts), and
names written as text, never as code (CSV cells, terminal lines).

An output is never an input photo, never the model file, never inside an input folder (the next
scan would read what was written there as photos), never another output of the same command, and
never an existing file unless its option replaces one (its help says so); an output folder must be
new or empty.  A refusal is a UsageError: one sentence, exit code 2, and not a byte written.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from fruitnet.errors import UsageError


def check_outputs(outputs: dict[str, str | Path | None], inputs=(), model: str | Path | None = None,
                  folders=(), replaces=(), adds_to=()) -> None:
    """Refuse the first unsafe output.  `outputs` maps each option (as the user typed it, e.g.
    "--csv") to its path or None (not given); `inputs` are the photos, folders and globs the
    command reads; `folders` names the options that take a new or empty folder, `adds_to` those
    that take a folder they add to (teach --into), `replaces` the file options that may replace
    an existing file."""
    files, dirs = _expand(inputs)
    if model:
        files.append(Path(model))
    seen: dict[Path, str] = {}
    for option, value in outputs.items():
        if not value:
            continue
        path = Path(value)
        where = path.resolve()
        _not_an_input(option, path, where, files, dirs, model)
        if where in seen:
            raise UsageError(f"{option} {path}: the same path as {seen[where]}; give each output its own")
        seen[where] = option
        if option in folders:
            _new_or_empty(option, path)
        elif option in adds_to:
            if path.exists() and not path.is_dir():
                raise UsageError(f"{option} {path}: is a file; {option} needs a folder")
        elif path.is_dir():
            raise UsageError(f"{option} {path}: is a folder; {option} needs a file name")
        elif path.exists() and option not in replaces:
            raise UsageError(f"{option} {path}: already exists; fruitnet never overwrites it: choose another {option}")


def _expand(inputs) -> tuple[list[Path], list[Path]]:
    """(files, folders) named by the inputs; a pattern that is not a path is a glob of files.
    Files inside a folder are not listed: anything inside an input folder is refused anyway."""
    files, dirs = [], []
    for given in inputs:
        if not given:
            continue
        if os.path.isdir(given):
            dirs.append(Path(given))
        elif os.path.lexists(given):
            files.append(Path(given))
        else:
            files += [Path(p) for p in glob.glob(str(given), recursive=True)]
    return files, dirs


def _not_an_input(option: str, path: Path, where: Path, files: list[Path], dirs: list[Path], model) -> None:
    for folder in dirs:
        inside = folder.resolve()
        if where == inside or inside in where.parents:
            raise UsageError(f"{option} {path}: inside the data folder {folder}; fruitnet never writes into its "
                             "inputs (the next scan would read the outputs as photos): choose a path outside it")
    for file in files:
        if where == file.resolve() or _same_file(path, file):
            what = "the model file" if model and file == Path(model) else "an input photo"
            raise UsageError(f"{option} {path}: is {what} ({file}); fruitnet never writes over its inputs: "
                             f"choose another {option}")


def _same_file(a: Path, b: Path) -> bool:
    """Also a hard link or a symlink to the same file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _new_or_empty(option: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: exists and is a file; {option} needs a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"{option} {path}: already exists and is not empty; choose another {option}")


# --- names on a terminal -----------------------------------------------------------------------

# C0 and C1 controls (ESC starts the sequences that retitle a terminal or clear its screen), the
# bidirectional overrides that reorder a line as shown, and lone surrogates (undecodable bytes of
# a file name, which would make print raise).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(line: str) -> str:
    """One line for a terminal: every control character escaped (\\x1b, \\n, \\u202e), so a file
    name is shown, never obeyed."""
    return _CONTROL.sub(lambda m: m[0].encode("unicode_escape", "backslashreplace").decode("ascii"), line)


# --- what goes into a CSV file -----------------------------------------------------------------

# A spreadsheet runs a cell that begins with one of these as a formula (=HYPERLINK(...), =cmd|...);
# OWASP's rule for CSV injection: such a cell is written with a leading ' so it shows as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_row(values) -> list:
    """The row with every text cell that a spreadsheet would run as a formula prefixed by '.
    Numbers stay numbers (a negative score is not text)."""
    return ["'" + v if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v for v in values]
