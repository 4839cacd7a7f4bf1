"""Which pretraining checkpoints are whole: every rank lists the files it wrote.

A checkpoint directory (``<storage>/<run>/step_NNNNNNN``) is the union of every rank's files.
Each rank adds ``files-rank<R>.json`` (file -> size in bytes) to its part, so a reader can
tell a whole checkpoint from one cut short by a full disk or a copy that broke off: all
``world`` lists present, every listed file there at its listed size. A resume that finds the
newest checkpoint broken names it and starts from the newest whole one instead.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

LIST_PATTERN = "files-rank{rank}.json"
STEP_PREFIX = "step_"
# The held-out score of a checkpoint saved without a held-out loss. Finite: Ray Train keeps
# checkpoint metrics as JSON, where infinity comes back as null, and a resumed run then fails
# to rank its checkpoints ("unsupported operand type(s) for *: 'float' and 'NoneType'").
NO_HELDOUT_SCORE = 1e30


def disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a storage layer only kept the message."""
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        "No space left on device" in str(err) or "Disk quota exceeded" in str(err)
    )


def write_file_list(directory: str | Path, rank: int) -> None:
    """List every file under ``directory`` (this rank's part) with its size."""
    root = Path(directory)
    sizes = {
        str(path.relative_to(root)): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
    (root / LIST_PATTERN.format(rank=rank)).write_text(json.dumps(sizes, indent=0))


def incomplete_reason(directory: str | Path, world_size: int) -> str | None:
    """None when the checkpoint is whole, else what is wrong with it (one line).

    A checkpoint without any list (written before lists existed) cannot be checked and
    counts as whole."""
    root = Path(directory)
    if not any(root.glob(LIST_PATTERN.format(rank="*"))):
        return None
    for rank in range(world_size):
        listing = root / LIST_PATTERN.format(rank=rank)
        try:
            sizes = json.loads(listing.read_text())
        except FileNotFoundError:
            return f"{listing.name} missing"
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{listing.name} unreadable"
        for name, size in sizes.items():
            path = root / name
            if not path.is_file():
                return f"{name} missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} of its {size} bytes"
    return None


def step_of(directory: str | Path) -> int:
    """``step_0000042`` -> 42 (-1 for another name)."""
    name = Path(directory).name
    digits = name.removeprefix(STEP_PREFIX)
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else -1


def newest_whole_checkpoint(
    run_dir: str | Path, world_size: int, before_step: int | None = None
) -> Path | None:
    """The newest whole checkpoint directory of ``run_dir`` (older than ``before_step``)."""
    candidates = sorted(
        (d for d in Path(run_dir).glob(f"{STEP_PREFIX}*") if d.is_dir() and step_of(d) >= 0),
        key=step_of,
        reverse=True,
    )
    for directory in candidates:
        if before_step is not None and step_of(directory) >= before_step:
            continue
        if incomplete_reason(directory, world_size) is None:
            return directory
    return None
