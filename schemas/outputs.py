"""Output safety: a writer replaces only what faceage itself wrote, and commits only after every check.

Every stage that writes (prepare's tables and manifests, score's predictions, evaluate's report,
train's run folder) goes through `Outputs`:

1. `check(names)` before any work: each entry `ROOT/name` must be absent, an empty folder, or
   recognised as faceage's own (a folder holding the `_FACEAGE.json` marker, or an entry listed in
   ROOT's marker). Anything else is refused with one line saying what is there.
2. The job writes into `staging(name)` (a hidden folder under ROOT, ignored by every reader).
3. After every check of the job passed, `commit(names)` moves each staged entry into place (the
   previous one is moved aside first and deleted last), then records the entries in ROOT's marker.
   `finish()` removes the staging folder only: a failed run leaves the previous outputs exactly as
   they were.

The rules are written once here against a tiny filesystem interface (`LocalFS` below; Spark jobs
use storage.HadoopFS for s3a://, hdfs:// and local alike). Paths are compared after resolving links
(`canonical_local`) so a symlink cannot smuggle an input inside an output.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Iterable, List, Optional, Sequence

from schemas.cli import UserError, dumps, new_run_id

MARKER = "_FACEAGE.json"
STAGING_PREFIX = "_faceage_staging_"
WRITER = "faceage"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/")] + [p.strip("/") for p in parts])


# ----------------------------------------------------------------------------- filesystems

class LocalFS:
    """The filesystem interface on local paths (plain paths or file: URIs)."""

    @staticmethod
    def _p(uri: str) -> str:
        from schemas.uri import strip_file_scheme

        return strip_file_scheme(uri)

    def exists(self, uri: str) -> bool:
        return os.path.lexists(self._p(uri))

    def isdir(self, uri: str) -> bool:
        return os.path.isdir(self._p(uri))

    def listdir(self, uri: str) -> List[str]:
        return sorted(os.listdir(self._p(uri)))

    def read_text(self, uri: str) -> str:
        with open(self._p(uri), encoding="utf-8") as f:
            return f.read()

    def write_text(self, uri: str, text: str) -> None:
        path = self._p(uri)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)

    def rename(self, src: str, dst: str) -> None:
        os.makedirs(os.path.dirname(self._p(dst)) or ".", exist_ok=True)
        os.replace(self._p(src), self._p(dst))

    def delete(self, uri: str) -> None:
        path = self._p(uri)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)

    def mkdirs(self, uri: str) -> None:
        os.makedirs(self._p(uri), exist_ok=True)

    def walk_files(self, uri: str) -> List[str]:
        root = self._p(uri)
        found = []
        for dirpath, _, filenames in os.walk(root):
            found += [os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/") for n in filenames]
        return sorted(found)


# ----------------------------------------------------------------------------- paths

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


def check_overlap(inputs, output: str, canonical) -> None:
    """Refuse an output inside an input, or an input inside the output, compared after resolving links
    (local paths) or qualifying (Hadoop URIs): a rerun would read its own output, or writing the
    output could destroy the input."""
    out = canonical(output)
    for given in inputs:
        real = canonical(given)
        if is_within(out, real):
            raise UserError(f"--output {output} is inside --input {given}: the job would read its own "
                            f"output next time; choose an output folder outside the input")
        if is_within(real, out):
            raise UserError(f"--input {given} is inside --output {output} (links resolved: {real}): writing "
                            f"the output could destroy the input; choose an output folder outside the input")


# ----------------------------------------------------------------------------- markers

def read_marker(fs, folder: str) -> Optional[dict]:
    """The faceage marker of `folder`, or None when there is none (or it is not ours)."""
    uri = join(folder, MARKER)
    try:
        if not fs.exists(uri):
            return None
        data = json.loads(fs.read_text(uri))
    except Exception:  # noqa: BLE001 - unreadable (any filesystem's error type): not a marker of ours
        return None
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


class Outputs:
    """The entries a run writes under one output root (see the module docstring)."""

    def __init__(self, fs, root: str, kind: str, run_id: Optional[str] = None,
                 legacy: Optional[Callable[[str], bool]] = None, flag: str = "--output"):
        self.fs, self.root, self.kind, self.flag = fs, root.rstrip("/"), kind, flag
        self.run_id = run_id or new_run_id()
        self.legacy = legacy  # name -> True when an entry written before markers existed is recognised
        self.staging_root = join(self.root, STAGING_PREFIX + self.run_id)
        self.committed: List[str] = []

    @classmethod
    def at(cls, output: str, kind: str, run_id: Optional[str] = None, manifest: Optional[tuple] = None,
           flag: str = "--output") -> "Outputs":
        """Outputs under `output` (a local path, file: URI or remote URI) on schemas.uri's filesystems;
        `manifest` = (file name, keys): a JSON file there holding those keys (written by faceage before
        markers existed) makes the entries faceage's."""
        from schemas import uri as uri_io

        root = output if uri_io.is_remote(output) else uri_io.local_path(output)
        fs = uri_io.fs_for(root)
        legacy = None
        if manifest is not None:
            name, keys = manifest
            legacy = lambda entry: looks_like_manifest(fs, join(root, name), keys)  # noqa: E731
        return cls(fs, root, kind, run_id, legacy, flag)

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

    def commit(self, names: Sequence[str], folder_markers: Sequence[str] = ()) -> None:
        """Move each staged entry into place; `folder_markers` get their own marker (tables)."""
        fs = self.fs
        self.check(names)  # nothing changed under us since the first check
        for name in folder_markers:
            fs.write_text(join(self.staging(name), MARKER), marker_text(self.kind, self.run_id))
        aside = join(self.staging_root, "_previous")
        for name in names:
            target = join(self.root, name)
            if fs.exists(target):
                fs.rename(target, join(aside, name))
            fs.rename(self.staging(name), target)
            self.committed.append(name)
            fs.delete(join(aside, name))
        self.record(names)

    def record(self, names: Iterable[str]) -> None:
        """Add `names` to ROOT's marker (entries faceage may replace next time)."""
        previous = read_marker(self.fs, self.root) or {}
        entries = set(previous.get("entries", ())) | set(names)
        self.fs.write_text(join(self.root, MARKER), marker_text(self.kind, self.run_id, entries))

    def mark_folder(self, name: str) -> None:
        """Write the marker inside ROOT/name (a table written in place, e.g. a Delta commit)."""
        self.fs.write_text(join(self.root, name, MARKER), marker_text(self.kind, self.run_id))

    def finish(self) -> None:
        """Remove this run's staging folder (and nothing else): after the last commit, or after a failure
        (then the previous outputs are exactly as they were)."""
        try:
            if self.fs.exists(self.staging_root):
                self.fs.delete(self.staging_root)
        except Exception:  # noqa: BLE001 - cleanup must not hide the error that caused it
            pass


def looks_like_manifest(fs, uri: str, keys: Sequence[str]) -> bool:
    """True when `uri` is a JSON object holding all `keys` (a manifest faceage wrote before markers)."""
    try:
        data = json.loads(fs.read_text(uri))
    except Exception:  # noqa: BLE001 - absent or unreadable (any filesystem's error type)
        return False
    return isinstance(data, dict) and all(k in data for k in keys)
