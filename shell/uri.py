"""One I/O layer for every path a stage reads or writes: local paths, file: URIs and remote URIs.

Remote URIs (s3://, s3a://, gs://, hdfs://, ...) go through fsspec (s3fs for S3); Spark jobs use
Hadoop's FileSystem through their session (HadoopFS below), and both see the same objects. The one
filesystem interface output safety is written against has three implementations here: LocalFS,
RemoteFS (fsspec) and HadoopFS (a SparkSession's JVM). An
S3-compatible endpoint other than AWS (a local test server, MinIO) is named the way every AWS SDK
reads it: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL.

The rule that keeps a user's disk clean: a string that looks like a URI (`scheme:...`) is a URI. A
mistyped one (`s3:/bucket/x`, `s3:bucket`) is refused with one line, never turned into a local
folder named `s3:`; a local path with a colon is written `./name:with:colon`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import shutil
from typing import List, Optional, Tuple

from shell.errors import UserError

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):(?P<rest>.*)$", re.S)
ALIASES = {"s3a": "s3", "s3n": "s3"}  # Hadoop's names for S3; fsspec's is s3://


def scheme(text: str) -> Optional[str]:
    """'file', a remote scheme ('s3a', 'gs', ...) in lower case, or None for a plain local path."""
    m = _SCHEME.match(str(text))
    return m["scheme"].lower() if m else None


def is_remote(text: str) -> bool:
    s = scheme(text)
    return s is not None and s != "file"


def check(text: str, flag: str = "path") -> str:
    """`text` if it is a local path, a file: URI or a well-formed remote URI; UserError otherwise."""
    text = str(text)
    m = _SCHEME.match(text)
    if not text:
        raise UserError(f"{flag}: empty path")
    if m is None or m["scheme"].lower() == "file":
        return text
    name = m["scheme"].lower()
    if not m["rest"].startswith("//") or not m["rest"][2:].strip("/"):
        raise UserError(f"{flag} {text}: looks like a URI ({name}:) but is not one: write {name}://bucket/path "
                        f"(or ./{text} for a local path with a colon in its name)")
    import fsspec

    if fsspec_protocol(text) not in fsspec.available_protocols():
        raise UserError(f"{flag} {text}: no filesystem for {name}:// (known here: s3://, s3a://, gs://, hdfs://, "
                        f"file:, local paths)")
    return text


def fsspec_protocol(uri: str) -> str:
    name = scheme(uri) or "file"
    return ALIASES.get(name, name)


def fsspec_url(uri: str) -> str:
    """`uri` as fsspec names it (s3a:// and s3n:// are s3://)."""
    name = scheme(uri)
    if name in ALIASES:
        return ALIASES[name] + uri[len(name):]
    return uri


def strip_file_scheme(uri: str) -> str:
    """A local path or file: URI as a filesystem path (relative paths stay relative)."""
    uri = str(uri)
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if uri.startswith("file:"):
        return uri[len("file:"):]
    return uri


def local_path(uri: str) -> Optional[str]:
    """The absolute filesystem path of a local path or file: URI; None for a remote URI."""
    if is_remote(uri):
        return None
    path = strip_file_scheme(uri)
    return path if str(uri).startswith("file:") else os.path.abspath(path)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/")] + [p.strip("/") for p in parts])


def parent(uri: str) -> str:
    """The folder `uri` is in ("." for a bare name)."""
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _endpoint_options(protocol: str) -> dict:
    """fsspec options for an S3-compatible endpoint named in the environment (botocore reads the same
    variables; saying it here also works with older SDKs)."""
    if protocol != "s3":
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"endpoint_url": endpoint} if endpoint else {}


def storage_options(uri: str) -> dict:
    """fsspec options for `uri` (e.g. Petastorm's storage_options): the endpoint of an S3-compatible server."""
    return _endpoint_options(fsspec_protocol(uri))


def delta_uri(uri: str) -> str:
    """`uri` as deltalake opens it (s3a:// is s3://; local paths as they are)."""
    path = local_path(uri)
    return path if path is not None else fsspec_url(uri)


def delta_options(uri: str) -> dict:
    """deltalake storage options for an S3-compatible endpoint from the environment (plain http allowed
    only when the endpoint says http)."""
    if fsspec_protocol(uri) != "s3":
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    options = {"AWS_ENDPOINT_URL": endpoint, "AWS_S3_ADDRESSING_STYLE": "path"}
    if endpoint.startswith("http:"):
        options["AWS_ALLOW_HTTP"] = "true"
    return options


def filesystem(uri: str) -> Tuple[object, str]:
    """(fsspec filesystem, path inside it) for a remote URI."""
    import fsspec

    protocol = fsspec_protocol(uri)
    # no listing cache: a writer's own rename or delete must be seen by its next check at once
    options = {"use_listings_cache": False} if protocol == "s3" else {}
    fs = fsspec.filesystem(protocol, **options, **_endpoint_options(protocol))
    return fs, fs._strip_protocol(fsspec_url(uri))


# ----------------------------------------------------------------------------- errors a user can fix

def describe_remote_error(e: BaseException) -> Optional[str]:
    """What a storage error means to the person who gave the URI (no bucket, no credentials, access denied,
    no connection), or None for an error that is not about the store."""
    name = type(e).__name__
    response = getattr(e, "response", None)
    code = (response or {}).get("Error", {}).get("Code") if isinstance(response, dict) else None
    if code in ("NoSuchBucket",) or "bucket does not exist" in str(e).lower():
        return "the bucket does not exist (create it, or fix the bucket name)"
    if code in ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch") \
            or isinstance(e, PermissionError):
        return f"access denied ({code or name}): check the credentials and the bucket's policy"
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return ("no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run where "
                "an instance profile is attached")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or \
            isinstance(e, (ConnectionError, TimeoutError)):
        return f"cannot reach the storage service ({name}): check the network, AWS_ENDPOINT_URL and the region"
    if code:
        return f"the storage service refused the request ({code})"
    return None


_JVM_STORAGE_ERRORS = (  # (pattern in the JVM's message, what it means)
    (r"UnknownStoreException|NoSuchBucket", "the bucket does not exist (create it, or fix the bucket name)"),
    (r"AccessDeniedException|\bAccessDenied\b|Status Code: 403",
     "access denied: check the credentials and the bucket's policy"),
    (r"NoAuthWithAWSException|Unable to load (AWS )?credentials|No AWS Credentials",
     "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run where an "
     "instance profile is attached"),
    (r"UnknownHostException|ConnectException|Unable to execute HTTP request",
     "cannot reach the storage service: check the network, AWS_ENDPOINT_URL and the region"),
)


def describe_jvm_error(e: BaseException) -> Optional[str]:
    """One line for a storage error raised inside Spark's JVM (S3A, HDFS), naming the URI; None otherwise."""
    java = getattr(e, "java_exception", None)
    if java is None:
        return None
    try:
        text = str(java.toString())
        cause = java.getCause()
        while cause is not None:
            text += " | " + str(cause.toString())
            cause = cause.getCause()
    except Exception:  # noqa: BLE001 - a dead gateway: nothing more to learn
        text = str(e)
    for pattern, reason in _JVM_STORAGE_ERRORS:
        if re.search(pattern, text):
            where = re.search(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'`]+", text)
            return f"{where.group(0).rstrip(':.,;') if where else 'storage'}: {reason}"
    return None


@contextlib.contextmanager
def remote_errors(uri: str, not_found_is_user_error: bool = False):
    """Storage errors on `uri` as one-line UserErrors (FileNotFoundError passes through to readers that
    handle it, unless `not_found_is_user_error`: a write into a missing bucket)."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as e:
        if not not_found_is_user_error:
            raise
        raise UserError(f"{uri}: {describe_remote_error(e) or 'no such bucket or prefix'}") from None
    except Exception as e:  # noqa: BLE001 - botocore's and aiohttp's error types, told apart below
        reason = describe_remote_error(e)
        if reason is None:
            raise
        raise UserError(f"{uri}: {reason}") from None


def _guarded(write: bool = False):
    """RemoteFS methods (first argument: the URI) with storage errors as one-line UserErrors."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, uri, *args, **kw):
            with remote_errors(uri, not_found_is_user_error=write):
                return method(self, uri, *args, **kw)
        return run
    return wrap


# ----------------------------------------------------------------------------- the filesystem interface

class RemoteFS:
    """shell.outputs' filesystem interface over fsspec (object stores have no folders: a prefix with
    objects under it is one; `mkdirs` makes nothing; a rename is a copy then a delete)."""

    def _p(self, uri: str):
        fs, path = filesystem(uri)
        return fs, path

    @_guarded(write=False)
    def exists(self, uri: str) -> bool:
        fs, path = self._p(uri)
        return bool(fs.exists(path))

    @_guarded(write=False)
    def isdir(self, uri: str) -> bool:
        fs, path = self._p(uri)
        return bool(fs.isdir(path))

    @_guarded(write=False)
    def isfile(self, uri: str) -> bool:
        fs, path = self._p(uri)
        return bool(fs.isfile(path))

    @_guarded(write=False)
    def listdir(self, uri: str) -> List[str]:
        fs, path = self._p(uri)
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False, refresh=True)
                      if p.rstrip("/") != path.rstrip("/"))

    @_guarded(write=False)
    def read_bytes(self, uri: str) -> bytes:
        fs, path = self._p(uri)
        return fs.cat_file(path)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    @_guarded(write=True)
    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self._p(uri)
        fs.pipe_file(path, data)  # one PUT: readers see the whole object or the previous one

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    @_guarded(write=True)
    def rename(self, src: str, dst: str) -> None:
        fs, s = self._p(src)
        _, d = self._p(dst)
        if fs.exists(d):
            raise OSError(f"rename {src} -> {dst}: the target exists")
        if fs.isfile(s):
            fs.copy(s, d)
        else:  # a prefix: every object under it (object stores have no rename; fsspec's recursive mv
            for obj in fs.find(s):  # also copies the folder's own pseudo-key, which does not exist)
                fs.copy(obj, d.rstrip("/") + obj[len(s.rstrip("/")):])
        fs.rm(s, recursive=True)
        fs.invalidate_cache()

    @_guarded(write=True)
    def delete(self, uri: str) -> None:
        fs, path = self._p(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.invalidate_cache()

    def mkdirs(self, uri: str) -> None:
        pass  # prefixes exist once an object is under them

    @_guarded(write=False)
    def walk_files(self, uri: str) -> List[str]:
        fs, root = self._p(uri)
        root = root.rstrip("/")
        return sorted(p[len(root) + 1:] for p in fs.find(root) if p.startswith(root + "/"))

    def put(self, local: str, uri: str) -> None:
        """Upload a local file, or a folder's files below `uri`."""
        with remote_errors(uri, not_found_is_user_error=True):
            self._put(local, uri)

    def _put(self, local: str, uri: str) -> None:
        fs, path = self._p(uri)
        if os.path.isdir(local):
            for dirpath, _, filenames in os.walk(local):
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    rel = os.path.relpath(full, local).replace(os.sep, "/")
                    fs.put_file(full, f"{path.rstrip('/')}/{rel}")
        else:
            fs.put_file(local, path)
        fs.invalidate_cache()

    @_guarded(write=False)
    def get(self, uri: str, local: str) -> None:
        fs, path = self._p(uri)
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        fs.get_file(path, local)


class LocalFS:
    """The filesystem interface on local paths (plain paths or file: URIs)."""

    @staticmethod
    def _p(uri: str) -> str:
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


def to_uri(path: str) -> str:
    """A local path -> file:/abs/path; URIs with a scheme stay as they are."""
    if "://" in path or path.startswith("file:"):
        return path.rstrip("/") if not path.endswith(":///") else path
    return "file:" + os.path.abspath(path)


class HadoopFS:
    """The filesystem interface over Hadoop's FileSystem (file:, s3a://, hdfs://, ...), through a running
    SparkSession's JVM: what Spark jobs commit with, so their files and their tables go through one client.
    Nothing here imports pyspark; `spark` is the session."""

    def __init__(self, spark):
        self.spark = spark

    def _p(self, uri: str):
        path = self.spark._jvm.org.apache.hadoop.fs.Path(to_uri(uri))
        return path, path.getFileSystem(self.spark._jsc.hadoopConfiguration())

    def qualify(self, uri: str) -> str:
        """`uri` as Hadoop resolves it (scheme, authority, absolute path): the form to compare URIs in."""
        path, fs = self._p(uri)
        return str(fs.makeQualified(path).toString()).rstrip("/")

    def exists(self, uri: str) -> bool:
        path, fs = self._p(uri)
        return bool(fs.exists(path))

    def isdir(self, uri: str) -> bool:
        path, fs = self._p(uri)
        return bool(fs.exists(path)) and bool(fs.getFileStatus(path).isDirectory())

    def listdir(self, uri: str):
        path, fs = self._p(uri)
        return sorted(str(s.getPath().getName()) for s in fs.listStatus(path))

    def read_text(self, uri: str) -> str:
        path, fs = self._p(uri)
        if not fs.exists(path):
            raise FileNotFoundError(uri)
        stream = fs.open(path)
        try:
            chunks = []
            buf = self.spark._jvm.java.io.ByteArrayOutputStream()
            self.spark._jvm.org.apache.hadoop.io.IOUtils.copyBytes(stream, buf, 65536, False)
            chunks.append(bytes(buf.toByteArray()))
        finally:
            stream.close()
        return b"".join(chunks).decode("utf-8")

    def write_text(self, uri: str, text: str) -> None:
        """Write (replace) a small text file; parent folders are created."""
        path, fs = self._p(uri)
        stream = fs.create(path, True)
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()

    def rename(self, src: str, dst: str) -> None:
        s, fs = self._p(src)
        d, _ = self._p(dst)
        fs.mkdirs(d.getParent())
        if fs.exists(d):
            raise OSError(f"rename {src} -> {dst}: the target exists")
        if not fs.rename(s, d):
            raise OSError(f"rename {src} -> {dst} failed")

    def delete(self, uri: str) -> None:
        path, fs = self._p(uri)
        if fs.exists(path):
            fs.delete(path, True)

    def mkdirs(self, uri: str) -> None:
        path, fs = self._p(uri)
        fs.mkdirs(path)

    def walk_files(self, uri: str):
        path, fs = self._p(uri)
        root = str(fs.makeQualified(path).toString()).rstrip("/")
        found, files = [], fs.listFiles(path, True)
        while files.hasNext():
            found.append(str(files.next().getPath().toString())[len(root) + 1:])
        return sorted(found)


def fs_for(uri: str):
    """The filesystem interface for `uri`: LocalFS for local paths, RemoteFS otherwise."""
    return RemoteFS() if is_remote(uri) else LocalFS()


# ----------------------------------------------------------------------------- whole files

def read_bytes(uri: str) -> bytes:
    path = local_path(uri)
    if path is not None:
        with open(path, "rb") as f:
            return f.read()
    return RemoteFS().read_bytes(uri)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write (replace) a small text file, local (atomically) or remote (one PUT)."""
    fs_for(uri).write_text(uri, text)


def exists(uri: str) -> bool:
    return fs_for(uri).exists(uri)


def isfile(uri: str) -> bool:
    path = local_path(uri)
    return os.path.isfile(path) if path is not None else RemoteFS().isfile(uri)


def put(local: str, uri: str) -> None:
    """Copy a local file or folder to `uri` (local or remote)."""
    path = local_path(uri)
    if path is None:
        RemoteFS().put(local, uri)
    elif os.path.abspath(local) != os.path.abspath(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.isdir(local):
            shutil.copytree(local, path, dirs_exist_ok=True)
        else:
            shutil.copyfile(local, path)


def get(uri: str, local: str) -> None:
    """Copy the file at `uri` to the local path `local`."""
    path = local_path(uri)
    if path is None:
        RemoteFS().get(uri, local)
    elif os.path.abspath(local) != os.path.abspath(path):
        shutil.copyfile(path, local)


class WorkFolder:
    """Where a run writes its files: the output folder itself when it is local; for a remote output a
    local folder whose files `push` uploads (whole objects, each replacing its previous version) and
    `pull` downloads (e.g. a checkpoint to resume from)."""

    def __init__(self, uri: str):
        from shell import scratch

        self.uri = uri
        self.remote = is_remote(uri)
        self.path = scratch.scratch_dir("faceage-run-") if self.remote else local_path(uri)
        os.makedirs(self.path, exist_ok=True)

    def local(self, name: str) -> str:
        return os.path.join(self.path, name)

    def pull(self, name: str) -> bool:
        """Download OUTPUT/name when the output is remote and has it; True when the local copy exists."""
        if self.remote:
            remote = RemoteFS()
            if remote.exists(join(self.uri, name)):
                remote.get(join(self.uri, name), self.local(name))
        return os.path.exists(self.local(name))

    def push(self, *names: str) -> None:
        if not self.remote:
            return
        for name in names:
            if os.path.exists(self.local(name)):
                RemoteFS().put(self.local(name), join(self.uri, name))

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)
