"""Output safety: a writer replaces only what faceage itself wrote, commits all of a run at once, and is
the only writer of its output while it runs.

Every stage that writes (prepare's tables and manifests, score's predictions, evaluate's report,
train's bundle and summary, tune's report) goes through `Outputs`:

1. `begin()` first: takes ROOT's lock (`_faceage.lock`: run id, pid, host, a heartbeat; a second
   writer is refused with `OutputBusyError` naming the holder; the lock of a holder that is gone (its
   pid no longer runs on this host, or its heartbeat stopped) is taken over, in one line), then
   `recover()`s what a killed run left (below).
2. `check(names)` before any work: each entry `ROOT/name` must be absent, an empty folder, or
   recognised as faceage's own (a folder holding the `_FACEAGE.json` marker, or an entry listed in
   ROOT's marker). Anything else is refused with one line saying what is there.
3. The job writes into `staging(name)` (a hidden folder under ROOT, ignored by every reader).
4. After every check of the job passed, `commit(steps)` is ONE transaction for every entry of the
   run: the plan is written to `_faceage_commit.json` (one atomic write: the commit point), then
   applied step by step (each step idempotent: an entry replaced by its staged copy, staged part
   files merged into a table, a Delta write made idempotent by its transaction id, a stale entry
   deleted), then the marker is updated and the journal removed. A process killed before the
   journal exists leaves the previous outputs as they were; killed after, the next writer of ROOT
   rolls the commit forward (and says so); until then readers refuse the folder (layout.pending_commit)
   instead of seeing half of one run and half of another.
5. `finish()` removes this run's staging folder and releases the lock.

The rules are written once here against a tiny filesystem interface (shell.uri.LocalFS; Spark jobs
use shell.uri.HadoopFS for s3a://, hdfs:// and local alike). Paths are compared after resolving links
(`canonical_local`) so a symlink cannot smuggle an input inside an output.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import socket
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from shell.cli import dumps, log, new_run_id, pause_point
from shell.errors import UserError
from shell.scratch import process_alive, process_start
from shell.uri import ALIASES, LocalFS, fs_for, is_remote, join, local_path, scheme

# the bookkeeping entries of an output root (every reader skips names that start with "_faceage")
MARKER = "_FACEAGE.json"  # which entries faceage wrote (and may replace)
STAGING_PREFIX = "_faceage_staging_"  # + run id: a run's staged entries until its commit
JOURNAL = "_faceage_commit.json"  # a commit's plan, while it is applied
LOCK = "_faceage.lock"  # who writes the root now
WRITER = "faceage"
LOCK_STALE_SECONDS = 600.0  # FACEAGE_LOCK_STALE_S: a lock whose heartbeat is older than this is a dead holder's
HEARTBEAT_SECONDS = 30.0


class OutputBusyError(UserError):
    """Another run holds the output's lock (exit 4: try again when it finished)."""

    exit_code = 4


def canonical_local(path: str) -> str:
    """A local path or file: URI, absolute with every symlink resolved (what it really points at)."""
    return os.path.realpath(LocalFS._p(path))


def is_within(child: str, parent: str) -> bool:
    """True when `child` is `parent` or inside it (both canonical)."""
    child, parent = child.rstrip("/") + "/", parent.rstrip("/") + "/"
    return child.startswith(parent)


def dedupe_inputs(inputs: Sequence[str], canonical: Callable[[str], str], flag: str = "--input") -> List[str]:
    """The inputs with exact repeats (after resolving) dropped; nested inputs are refused, since every
    file under both would be read twice."""
    kept, seen = [], {}
    for given in inputs:
        real = canonical(given)
        if real in seen:
            continue
        for other_real, other_given in seen.items():
            if is_within(real, other_real) or is_within(other_real, real):
                inner, outer = (given, other_given) if is_within(real, other_real) else (other_given, given)
                raise UserError(f"{flag} {inner} is inside {flag} {outer} (links resolved): its files would be "
                                f"read twice; give only the outer folder")
        seen[real] = given
        kept.append(given)
    return kept


def canonical(uri: str) -> str:
    """A path or URI in the form to compare it in: local ones absolute with every link resolved; remote ones
    with s3a:// and s3n:// spelled s3:// (one bucket, three spellings) and the path normalised."""
    path = local_path(uri)
    if path is not None:
        return os.path.realpath(path)
    kind = ALIASES.get(scheme(uri) or "", scheme(uri) or "")
    return f"{kind}://{posixpath.normpath(uri.split('://', 1)[1])}"


def check_overlap(inputs, output: str, canonical=canonical, output_flag: str = "--output") -> None:
    """Refuse an output inside an input, or an input inside the output (equal counts as both), compared
    after resolving links (local paths) or qualifying (Hadoop URIs): a rerun would read its own output,
    or writing the output could destroy the input. `inputs`: URIs (taken as --input) or (flag, URI) pairs,
    every input of the stage (photo folders, tables, label files, the model)."""
    out = canonical(output)
    for item in inputs:
        flag, given = item if isinstance(item, tuple) else ("--input", item)
        if given is None:
            continue
        real = canonical(given)
        if is_within(out, real):
            raise UserError(f"{output_flag} {output} is inside {flag} {given} (links resolved): the output would "
                            f"change what the job reads (its own output read next time); choose an {output_flag} "
                            f"outside {flag}")
        if is_within(real, out):
            raise UserError(f"{flag} {given} is inside {output_flag} {output} (links resolved: {real}): writing "
                            f"the output could destroy it; choose an {output_flag} outside {flag}")


# ----------------------------------------------------------------------------- markers

def _json_at(fs, uri: str, unreadable: tuple):
    """The JSON value of the file at `uri`; None when it is absent or raises one of `unreadable`."""
    try:
        return json.loads(fs.read_text(uri)) if fs.exists(uri) else None
    except unreadable:
        return None


def read_marker(fs, folder: str) -> Optional[dict]:
    """The faceage marker of `folder`, or None when there is none (or it is not ours)."""
    # unreadable for any reason (any filesystem's error type): not a marker of ours
    data = _json_at(fs, join(folder, MARKER), (Exception,))
    return data if isinstance(data, dict) and data.get("writer") == WRITER else None


def marker_text(kind: str, run_id: str, entries: Iterable[str] = ()) -> str:
    return dumps({"writer": WRITER, "kind": kind, "run_id": run_id, "entries": sorted(set(entries)),
                  "note": "written by faceage: the folder (or the entries listed) may be replaced by faceage's "
                          "--mode overwrite; anything else here is never touched"})


def _describe(fs, uri: str) -> str:
    if not fs.isdir(uri):
        return "a file"
    names = [n for n in fs.listdir(uri)]
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"a folder of {len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def _alive(holder: dict) -> bool:
    return process_alive(holder.get("pid"), holder.get("pid_start"))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class OutputLock:
    """One writer per output root: `_faceage.lock` holds who writes (run id, stage, pid, host) and a heartbeat
    refreshed every HEARTBEAT_SECONDS while the run lives. Local roots are locked with an atomic link (two
    runs cannot both create it); remote ones (object stores have no exclusive create) by writing then
    reading back. A holder is gone when its pid no longer runs on this host, or its heartbeat is older than
    FACEAGE_LOCK_STALE_S seconds (default 600): then the lock is taken over, in one line."""

    def __init__(self, fs, root: str, run_id: str, kind: str, flag: str = "--output"):
        self.fs, self.root, self.run_id, self.kind, self.flag = fs, root, run_id, kind, flag
        self.uri = join(root, LOCK)
        self.local = _local_root(root)
        self.held = False
        self.took_over: Optional[dict] = None  # the lock of a holder that was gone, when this run took it
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _body(self) -> dict:
        pid = os.getpid()
        return {"writer": WRITER, "run_id": self.run_id, "kind": self.kind, "pid": pid, "pid_start": process_start(pid),
                "host": socket.gethostname(), "started_at": getattr(self, "_started", None) or _now(),
                "heartbeat_at": _now(), "heartbeat_unix": time.time()}

    def _read(self) -> Optional[dict]:
        try:
            if self.local is not None:
                with open(os.path.join(self.local, LOCK), encoding="utf-8") as f:
                    data = json.load(f)
            else:
                data = json.loads(self.fs.read_text(self.uri))
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - torn or foreign: unreadable as a lock of ours
            return {}
        return data if isinstance(data, dict) else {}

    def _create(self) -> bool:
        """True when this run now holds the lock (it was absent)."""
        body = dumps(self._body())
        if self.local is not None:
            os.makedirs(self.local, exist_ok=True)
            tmp = os.path.join(self.local, f"{LOCK}.{self.run_id}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(body)
            try:
                os.link(tmp, os.path.join(self.local, LOCK))  # atomic: fails when a lock is there
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        if self.fs.exists(self.uri):
            return False
        self.fs.write_text(self.uri, body)
        return (self._read() or {}).get("run_id") == self.run_id  # the last of two racing writers wins

    def _stale(self, holder: dict) -> Optional[str]:
        """Why `holder` is gone (None when it may still run)."""
        if not holder:
            return "unreadable lock"
        if holder.get("host") == socket.gethostname() and not _alive(holder):
            return f"pid {holder.get('pid')} no longer runs"
        bound = float(os.environ.get("FACEAGE_LOCK_STALE_S", LOCK_STALE_SECONDS))
        beat = holder.get("heartbeat_unix")
        if isinstance(beat, (int, float)) and time.time() - beat > bound:
            return f"no heartbeat for {time.time() - beat:.0f} s (more than {bound:.0f} s)"
        return None

    def acquire(self) -> None:
        self._started = _now()
        for _ in range(3):
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            why = self._stale(holder)
            if why is None:
                raise OutputBusyError(
                    f"{self.flag} {self.root} is being written by run {holder.get('run_id')} "
                    f"({holder.get('kind')}, pid {holder.get('pid')} on {holder.get('host')}, since "
                    f"{holder.get('started_at')}); wait for it to finish or choose another {self.flag}")
            log.warning(f"{self.flag} {self.root}: took over the lock of run {holder.get('run_id')} "
                        f"({holder.get('kind')}, pid {holder.get('pid')} on {holder.get('host')}): {why}")
            self.took_over = holder
            if (self._read() or {}).get("run_id") == holder.get("run_id"):  # still the gone holder's
                self._delete()
        else:
            raise OutputBusyError(f"{self.flag} {self.root}: could not take its lock ({self.uri}); another run "
                                  f"keeps taking it. Try again")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="faceage-lock-heartbeat", daemon=True)
        self._thread.start()

    def _delete(self) -> None:
        if self.local is not None:
            try:
                os.remove(os.path.join(self.local, LOCK))
            except FileNotFoundError:
                pass
        else:
            self.fs.delete(self.uri)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if (self._read() or {}).get("run_id") != self.run_id:
                    return  # taken over (we looked dead): never write over the new holder
                body = dumps(self._body())
                if self.local is not None:
                    tmp = os.path.join(self.local, f"{LOCK}.{self.run_id}.beat")
                    with open(tmp, "w", encoding="utf-8") as f:
                        f.write(body)
                    os.replace(tmp, os.path.join(self.local, LOCK))
                else:
                    self.fs.write_text(self.uri, body)
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried; the run goes on
                pass

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if (self._read() or {}).get("run_id") == self.run_id:
                self._delete()
        except Exception:  # noqa: BLE001 - cleanup must not hide the error that caused it
            pass
        self.held = False


def _local_root(root: str) -> Optional[str]:
    return local_path(root)


# ----------------------------------------------------------------------------- commits

def replace(name: str) -> dict:
    """A commit step: ROOT/name becomes its staged copy (the previous one is moved aside, deleted last)."""
    return {"how": "replace", "name": name}


def merge(name: str) -> dict:
    """A commit step: the staged table's part files join the Parquet table ROOT/name (an append)."""
    return {"how": "merge", "name": name}


def remove(name: str) -> dict:
    """A commit step: ROOT/name, an entry of an earlier run this one does not have, is deleted."""
    return {"how": "remove", "name": name}


class Outputs:
    """The entries a run writes under one output root (see the module docstring)."""

    def __init__(self, fs, root: str, kind: str, run_id: Optional[str] = None,
                 legacy: Optional[Callable[[str], bool]] = None, flag: str = "--output",
                 appliers: Optional[Dict[str, Callable[[dict, str, str], None]]] = None):
        self.fs, self.root, self.kind, self.flag = fs, root.rstrip("/"), kind, flag
        self.run_id = run_id or new_run_id()
        self.legacy = legacy  # name -> True when an entry written before markers existed is recognised
        self.staging_root = join(self.root, STAGING_PREFIX + self.run_id)
        self.committed: List[str] = []
        # how -> fn(step, staged uri, target uri) for steps this module cannot apply itself (a Delta write)
        self.appliers = dict(appliers or {})
        self.lock = OutputLock(fs, self.root, self.run_id, kind, flag)

    @classmethod
    def at(cls, output: str, kind: str, run_id: Optional[str] = None, manifest: Optional[tuple] = None,
           flag: str = "--output") -> "Outputs":
        """Outputs under `output` (a local path, file: URI or remote URI) on shell.uri's filesystems;
        `manifest` = (file name, keys): a JSON file there holding those keys (written by faceage before
        markers existed) makes the entries faceage's."""
        root = output if is_remote(output) else local_path(output)
        fs = fs_for(root)
        legacy = None
        if manifest is not None:
            name, keys = manifest
            legacy = lambda entry: looks_like_manifest(fs, join(root, name), keys)  # noqa: E731
        return cls(fs, root, kind, run_id, legacy, flag)

    # -- the lock and what killed runs left
    def begin(self) -> "Outputs":
        """Take ROOT's lock, then finish or roll back what a killed run left there. Before any other work."""
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise UserError(f"{self.flag} {self.root} is a file, not a folder: give a folder for the outputs")
        self._made_root = not self.fs.exists(self.root)  # then a run that commits nothing leaves no folder
        self.lock.acquire()
        try:
            self.recover()
        except BaseException:
            self.lock.release()
            raise
        return self

    def recover(self) -> None:
        """A journal left by a killed commit: roll it forward (its steps are idempotent). Staging folders of
        runs killed before their commit point: removed (nothing of them was committed). One line each."""
        fs = self.fs
        if not fs.isdir(self.root):
            return
        journal = read_journal(fs, self.root)
        finished = None
        if journal is not None:
            staging = join(self.root, journal["staging"])
            if not fs.exists(staging):  # killed after the last step, before the journal went: nothing left to do
                fs.delete(join(self.root, JOURNAL))
            else:
                self._apply(journal["steps"], staging, recovering=journal)
                self.record(*_entries(journal["steps"]))
                fs.delete(join(self.root, JOURNAL))
                fs.delete(staging)
                log.warning(f"{self.flag} {self.root}: finished the commit of run {journal.get('run_id')} "
                            f"({journal.get('kind')}), killed after its commit point; its outputs are the current ones")
            finished = journal["staging"]
        elif fs.exists(join(self.root, JOURNAL)):  # torn: the process died writing it, before any step ran
            fs.delete(join(self.root, JOURNAL))
        for name in fs.listdir(self.root):
            if name.startswith(STAGING_PREFIX) and name != finished and join(self.root, name) != self.staging_root:
                fs.delete(join(self.root, name))
                log.warning(f"{self.flag} {self.root}: removed {name}, left by run {name[len(STAGING_PREFIX):]} "
                            f"that stopped before its commit point (nothing of it was committed)")

    # -- checks
    def owned(self, name: str) -> bool:
        """True when ROOT/name is absent, an empty folder, or faceage's own."""
        fs, uri = self.fs, join(self.root, name)
        if not fs.exists(uri):
            return True
        marker = read_marker(fs, self.root) if fs.isdir(self.root) else None
        if marker and name in marker.get("entries", ()):
            return True
        if fs.isdir(uri) and (not fs.listdir(uri) or read_marker(fs, uri) is not None):
            return True
        return bool(self.legacy and self.legacy(name))

    def check(self, names: Sequence[str]) -> None:
        """Refuse (UserError) before any work when ROOT is a file or an entry is not ours."""
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise UserError(f"{self.flag} {self.root} is a file, not a folder: give a folder for the outputs")
        for name in names:
            if not self.owned(name):
                uri = join(self.root, name)
                raise UserError(f"{self.flag} {self.root}: {name} there is {_describe(self.fs, uri)} that faceage "
                                f"did not write; refusing to replace it. Choose another {self.flag} or move it away")

    def exists(self, name: str) -> bool:
        return self.fs.exists(join(self.root, name))

    # -- staging and commit
    def staging(self, name: str) -> str:
        return join(self.staging_root, name)

    def stage_text(self, name: str, text: str) -> str:
        """A small file of this run (a manifest) staged under `name`; returns its staged URI."""
        uri = self.staging(name)
        self.fs.write_text(uri, text)
        return uri

    def commit(self, steps: Sequence, folder_markers: Sequence[str] = ()) -> None:
        """Make every staged entry of the run current in ONE transaction (see the module docstring).
        `steps`: entry names (replaced by their staged copies) or step dicts (replace/merge/remove, or a
        kind of this Outputs' appliers); `folder_markers` get their own marker (tables)."""
        fs = self.fs
        steps = [replace(s) if isinstance(s, str) else dict(s) for s in steps]
        names = [s["name"] for s in steps]
        self.check(names)  # nothing changed under us since the first check
        for name in folder_markers:
            fs.write_text(join(self.staging(name), MARKER), marker_text(self.kind, self.run_id))
        journal = {"writer": WRITER, "run_id": self.run_id, "kind": self.kind, "created_at": _now(),
                   "staging": STAGING_PREFIX + self.run_id, "steps": steps}
        pause_point("commit-before")  # a kill here: the previous outputs, untouched
        _write_atomically(fs, join(self.root, JOURNAL), dumps(journal))  # the commit point
        self._apply(steps, self.staging_root)
        self.record(*_entries(steps))
        fs.delete(join(self.root, JOURNAL))
        self.committed += names

    def _apply(self, steps: Sequence[dict], staging: str, recovering: Optional[dict] = None) -> None:
        fs = self.fs
        aside = join(staging, "_previous")
        for i, step in enumerate(steps):
            how, name = step["how"], step["name"]
            staged, target = join(staging, name), join(self.root, name)
            if how == "replace":
                if fs.exists(staged):
                    if fs.exists(target) and not fs.exists(join(aside, name)):
                        fs.rename(target, join(aside, name))
                    elif fs.exists(target):  # moved aside before, and something (ours) is back: the staged copy wins
                        fs.delete(target)
                    fs.rename(staged, target)
                fs.delete(join(aside, name))
            elif how == "merge":
                success = join(target, "_SUCCESS")
                if fs.exists(staged):
                    if fs.exists(success):
                        fs.delete(success)  # mid-merge the table is visibly unfinished
                    for rel in fs.walk_files(staged):
                        if any(part[:1] in ("_", ".") for part in rel.split("/")):
                            continue
                        fs.rename(join(staged, rel), join(target, rel))
                    fs.delete(staged)
                if not fs.exists(success):
                    fs.write_text(success, "")
                fs.write_text(join(target, MARKER), marker_text(self.kind, self.run_id))
            elif how == "remove":
                if fs.exists(target):
                    fs.delete(target)
            elif how in self.appliers:
                self.appliers[how](step, staged, target)
            else:
                raise UserError(f"{self.flag} {self.root}: the interrupted commit of run "
                                f"{(recovering or {}).get('run_id', self.run_id)} has a step this job cannot "
                                f"finish ({how} {name}); rerun the job that wrote it ({(recovering or {}).get('kind')}) "
                                f"with the same {self.flag}")
            if i + 1 < len(steps):
                pause_point("commit-step")  # a kill here: the next writer rolls the commit forward

    def record(self, names: Iterable[str], dropped: Iterable[str] = ()) -> None:
        """Add `names` to ROOT's marker (entries faceage may replace next time); `dropped` leave it."""
        previous = read_marker(self.fs, self.root) or {}
        entries = (set(previous.get("entries", ())) | set(names)) - set(dropped)
        self.fs.write_text(join(self.root, MARKER), marker_text(self.kind, self.run_id, entries))

    def mark_folder(self, name: str) -> None:
        """Write the marker inside ROOT/name (a table written in place, e.g. a Delta commit)."""
        self.fs.write_text(join(self.root, name, MARKER), marker_text(self.kind, self.run_id))

    def finish(self) -> None:
        """Remove this run's staging folder (and nothing else) and release the lock: after the commit, or after
        a failure before it (then the previous outputs are exactly as they were). A failure after the commit
        point keeps the staging folder: the journal needs it to roll forward."""
        try:
            if not self._journal_is_mine() and self.fs.exists(self.staging_root):
                self.fs.delete(self.staging_root)
        except Exception:  # noqa: BLE001 - cleanup must not hide the error that caused it
            pass
        finally:
            self.lock.release()
            try:
                if getattr(self, "_made_root", False) and self.fs.isdir(self.root) and not self.fs.listdir(self.root):
                    self.fs.delete(self.root)  # made by begin() for the lock, and nothing was committed
            except Exception:  # noqa: BLE001 - cleanup must not hide the error that caused it
                pass

    def _journal_is_mine(self) -> bool:
        try:
            return (read_journal(self.fs, self.root) or {}).get("run_id") == self.run_id
        except Exception:  # noqa: BLE001 - unreadable: keep the staging folder, the next run decides
            return True


def _entries(steps: Sequence[dict]):
    """(top-level entries a commit made faceage's, entries it removed) for ROOT's marker."""
    kept = {s["name"].split("/")[0] for s in steps if s["how"] != "remove"}
    return sorted(kept), [s["name"] for s in steps if s["how"] == "remove" and "/" not in s["name"]]


def read_journal(fs, root: str) -> Optional[dict]:
    """The commit journal of `root` (None when absent or torn: then no step of it ever ran)."""
    data = _json_at(fs, join(root, JOURNAL), (ValueError, UnicodeDecodeError))  # an I/O error is raised
    ok = isinstance(data, dict) and data.get("writer") == WRITER and isinstance(data.get("steps"), list) \
        and str(data.get("staging", "")).startswith(STAGING_PREFIX) and "/" not in data["staging"]
    return data if ok else None


def _write_atomically(fs, uri: str, text: str) -> None:
    """Local: a temporary file renamed over (os.replace). Object stores: one PUT (whole or absent)."""
    path = _local_root(uri)
    if path is not None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.write_text(uri, text)


def looks_like_manifest(fs, uri: str, keys: Sequence[str]) -> bool:
    """True when `uri` is a JSON object holding all `keys` (a manifest faceage wrote before markers)."""
    try:
        data = json.loads(fs.read_text(uri))
    except Exception:  # noqa: BLE001 - absent or unreadable (any filesystem's error type)
        return False
    return isinstance(data, dict) and all(k in data for k in keys)
