"""What can go wrong in a job, as the user sees it: one error type, its exit codes, a full disk told apart.

`UserError` is something the user gave (a flag, a file, a table) that they must fix; shell.cli's error
boundary turns it into one `<stage>: error: ...` line and its exit code. Nothing here imports the rest
of the project, so every layer can raise these.
"""
from __future__ import annotations

import os
import re
from typing import Optional

USAGE_EXIT = 2  # a user's mistake (a UserError); 3: Spark did not start, 4: the output is busy, 5: disk full


class UserError(Exception):
    """Something the user gave (a flag, a file, a table) that they must fix; the message says what."""


DISK_FULL_EXIT = 5
_NO_SPACE = re.compile(r"No space left on device|Disk quota exceeded|ENOSPC|EDQUOT")


def _chain_text(e: BaseException) -> str:
    """The messages of `e`, its causes and contexts, and of a Py4J error's Java cause chain, in one string."""
    texts, seen, cur = [], set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        texts.append(f"{type(cur).__name__}: {cur}")
        java = getattr(cur, "java_exception", None)
        if java is not None:
            try:
                cause = java
                while cause is not None:
                    texts.append(str(cause.toString()))
                    cause = cause.getCause()
            except Exception:  # noqa: BLE001 - a dead gateway: nothing more to learn
                pass
        cur = cur.__cause__ or cur.__context__
    return " | ".join(texts)


def disk_full(e: BaseException) -> Optional[str]:
    """One line when `e` (anywhere in its chain, the JVM's included) says a disk is full; None otherwise."""
    import errno

    cur, seen, where = e, set(), ""
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {cur.filename}" if cur.filename else ""
            break
        cur = cur.__cause__ or cur.__context__
    else:
        if not _NO_SPACE.search(_chain_text(e)):
            return None
    return (f"no space left on the device{where}: free some space (or write elsewhere) and rerun; what was "
            f"committed before is intact (a commit cut short is finished by the next run)")


def check_space(error: BaseException, path: str, least: int = 64 * 2**20) -> None:
    """Raise ENOSPC for `error` (e.g. torch.save's `basic_ios::clear: iostream error`) when the folder of `path`
    has less than `least` bytes free: the one line then says what happened. Returns otherwise."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or ".").free
    except OSError:
        return
    if free < least:
        raise OSError(errno.ENOSPC, "No space left on device", path) from error
