"""Whether a process still runs, and local scratch folders that a killed run does not leave behind for good.

A run removes its scratch folder when it ends; a run killed with SIGKILL (or by the kernel for memory) cannot.
So a folder's name carries who made it: this machine and its process-id namespace, the process id and the
process's start time. Each new scratch folder first removes the folders of the same kind whose process is gone
(or is a zombie, or is another process that reused the id), made on this machine in this namespace and owned by
this user. A folder of a live process, of another namespace (a container sharing /tmp), of another user or of
another kind is left alone.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from typing import List, Optional


def _proc_stat(pid: int) -> tuple:
    """(state, start time) of process `pid` from Linux /proc, (None, None) elsewhere or when it does not run.
    A pid reused by another process after the first one died has another start time; a killed process whose
    parent has not reaped it yet (a zombie, state Z, e.g. a Spark driver whose JVM was killed with it) still
    answers kill(pid, 0) but runs no more."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None, None


def process_start(pid: int) -> Optional[str]:
    """Process `pid`'s start time (clock ticks since boot, from /proc), None where /proc does not tell."""
    return _proc_stat(pid)[1]


def process_alive(pid, started: Optional[str] = None) -> bool:
    """Whether process `pid` of this machine still runs: not gone, not a zombie, and (when `started`, its start
    time from /proc, is given) not another process that reused the pid."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # runs, as another user
    state, now_started = _proc_stat(pid)
    if state in ("Z", "X"):
        return False
    return now_started is None or started in (None, now_started)


def _origin() -> str:
    """A short tag for this machine and process-id namespace: process ids are compared only within it."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (not Linux): the machine alone
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]


def sweep(prefix: str, root: Optional[str] = None) -> List[str]:
    """Remove the scratch folders `prefix`* under `root` (the temp folder) that processes no longer running left,
    made on this machine and namespace and owned by this user; returns the removed paths."""
    root = root or tempfile.gettempdir()
    pattern = re.compile(re.escape(prefix) + re.escape(_origin()) + r"-(\d+)-(\d+|x)-[^/]+$")
    removed = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if not match:
            continue
        pid, started = int(match.group(1)), (None if match.group(2) == "x" else match.group(2))
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if (pid == os.getpid() or process_alive(pid, started) or not os.path.isdir(path) or os.path.islink(path)
                or st.st_uid != os.getuid()):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def scratch_dir(prefix: str, root: Optional[str] = None) -> str:
    """A new local folder `<root>/<prefix><origin>-<pid>-<start>-<random>` (root: the temp folder, $TMPDIR), made
    after removing the folders of `prefix` that processes no longer running left. The caller removes it."""
    sweep(prefix, root)
    pid = os.getpid()
    return tempfile.mkdtemp(prefix=f"{prefix}{_origin()}-{pid}-{process_start(pid) or 'x'}-", dir=root)
