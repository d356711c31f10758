"""The one walker of local photo folders (prepare, score and predict list their inputs with it).

Links are followed (a folder of links to photos is a normal input), but each real folder (device + inode)
is listed once: a link to a folder already listed -- a loop such as `again -> .`, or a second path to the
same folder -- is one entry of its own, marked skipped, and is not entered. The walk is bounded in entries
and depth (FACEAGE_MAX_LISTED, FACEAGE_MAX_DEPTH); past a bound it stops with one line (UserError).
"""
import os
from typing import Iterator, NamedTuple, Optional

from shell.errors import UserError

MAX_LISTED = 5_000_000  # entries per input; about 1 GB of listing held by the driver
MAX_DEPTH = 100  # folders below an input


class Entry(NamedTuple):
    path: str  # as walked (through link names), joined onto the input as the user wrote it
    length: Optional[int]  # None: cannot stat (a dangling link, no permission), or a skipped link
    loop_of: Optional[str] = None  # set for a link to a folder already listed: that folder's real path


def _limit(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r}: not a whole number") from None
    if value < 1:
        raise UserError(f"{name}={raw}: must be at least 1")
    return value


def walk(root: str) -> Iterator[Entry]:
    """Every file under `root` (a local folder), in name order, depth first; see the module docstring."""
    max_listed, max_depth = _limit("FACEAGE_MAX_LISTED", MAX_LISTED), _limit("FACEAGE_MAX_DEPTH", MAX_DEPTH)
    try:
        top = os.stat(root)
    except OSError as e:
        raise UserError(f"{root}: cannot list ({e.strerror or e})") from None
    seen = {(top.st_dev, top.st_ino): root}
    stack = [(root, 0)]
    listed = 0
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it)
        except OSError:
            if folder == root:
                raise UserError(f"{root}: cannot list its entries (no permission?)") from None
            names = []
        below = []
        for name in names:
            full = os.path.join(folder, name)
            listed += 1
            if listed > max_listed:
                raise UserError(f"{root}: more than {max_listed} entries; list a smaller folder, or raise "
                                f"FACEAGE_MAX_LISTED")
            try:
                st = os.stat(full)  # follows links
            except OSError:
                yield Entry(full, None)
                continue
            if not os.path.isdir(full):
                yield Entry(full, st.st_size)
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                yield Entry(full, None, os.path.realpath(full))
                continue
            if depth + 1 > max_depth:
                raise UserError(f"{full}: more than {max_depth} folders deep below {root}; list a shallower "
                                f"folder, or raise FACEAGE_MAX_DEPTH")
            seen[key] = full
            below.append(full)
        stack += [(f, depth + 1) for f in reversed(below)]  # popped in name order
