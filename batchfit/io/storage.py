"""Where a path lives: on this machine, or in a store that a URI names (``s3://bucket/key``,
``gs://``, ``abfs://``, ``hdfs://``; ``file://`` is this machine). A URI is reached through
pyarrow's filesystem for its scheme, else through fsspec's (``pip install
'batchfit[remote]'``). Credentials and endpoints come from each store's own environment and
configuration (S3: ``AWS_*``, ``AWS_ENDPOINT_URL``); the options of ``using`` (the CLI's
``--storage-option KEY=VALUE``) go to the filesystem, to pyarrow's as its URI's query
parameters. No message and no metadata shows a URI's credentials: ``shown`` drops them, and
``redacted`` removes option values from a store's error text.

Local paths keep the operating system's calls (renames are atomic there, links can be told
apart); everything else goes through a ``pyarrow.fs.FileSystem``."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import urllib.parse

import pyarrow as pa
import pyarrow.fs as pafs

from batchfit.io.schema import first_line

_SCHEME = r"^([A-Za-z][A-Za-z0-9+.-]*)://"
_SECRET_WORDS = ("secret", "key", "token", "password", "credential", "sas", "signature")
_options: dict[str, str] = {}  # the storage options of the current job (``using``)


def scheme(path: str) -> str | None:
    match = re.match(_SCHEME, os.fspath(path))
    return match.group(1).lower() if match else None


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URI of a store other than this machine's file system."""
    return scheme(path) not in (None, "file")


def local_path(path: str) -> str:
    """A local path as the operating system takes it (a ``file://`` URI's path)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(path).path) \
        if scheme(path) == "file" else path


@contextlib.contextmanager
def using(options: dict[str, str] | None):
    """Reach stores with ``options`` (KEY: VALUE strings) inside the block."""
    global _options
    before, _options = _options, dict(options or {})
    try:
        yield
    finally:
        _options = before


def current_options() -> dict[str, str]:
    return dict(_options)


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--storage-option``) as a dict."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"storage_option must be KEY=VALUE, got {shown(pair)!r}")
        options[key.strip()] = value
    return options


def split(path: str) -> tuple[str, dict[str, str]]:
    """A URI without its query, and the query's options (so that no file name carries them
    into a message). Credentials in a URI's user part are refused."""
    if not is_remote(path):
        return path, {}
    parts = urllib.parse.urlsplit(path)
    if ":" in parts.netloc.rpartition("@")[0]:
        raise ValueError(f"{shown(path)}: a URI may not hold a password; give credentials "
                         "in the store's environment (for S3, AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY) or as --storage-option")
    return _bare(path), dict(urllib.parse.parse_qsl(parts.query))


def _bare(path: str) -> str:
    # (by hand: urlunsplit turns an empty host's "local:///x" into "local:/x")
    return path.split("#", 1)[0].split("?", 1)[0]


def shown(path: str) -> str:
    """``path`` as messages and metadata show it: a URI without its ``user:password@`` and
    its query (where credentials may be; Azure's ``container@account`` stays)."""
    if scheme(path) is None:
        return path
    return re.sub(r"^([^:]+://)[^/@]*:[^/@]*@", r"\1", _bare(path))


def redacted(text: str) -> str:
    """A store's error text without the secrets that the options or the URI carried."""
    for key, value in _options.items():
        if value and len(value) >= 4 and any(word in key.lower() for word in _SECRET_WORDS):
            text = text.replace(value, "***")
    return re.sub(r"(://)[^/@\s:]+:[^/@\s]+@", r"\1", text)


# What a store's error text means, where its words are cryptic (pyarrow's S3 errors).
_MEANINGS = (("ACCESS_DENIED", "access denied (check the credentials and their rights)"),
             ("NETWORK_CONNECTION", "cannot connect (check the endpoint)"),
             ("HTTP status 5", "the store kept failing, after retries (try again later)"))


def failure(what: str, exc: BaseException) -> ValueError:
    """A store's error as batchfit's one line: ``what`` (``cannot read s3://...``), then why."""
    text = redacted(first_line(exc))
    meaning = next((said for word, said in _MEANINGS if word in text), None)
    return ValueError(f"{what}: {meaning}: {text}" if meaning else f"{what}: {text}")


def locate(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``path`` and the path inside it (local: the operating system's)."""
    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(path))
    return _located(path, tuple(sorted(_options.items())), _environment())


_ENVIRONMENT_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "HADOOP_", "ARROW_")


def _environment() -> tuple:
    """The stores' environment (endpoints, credentials): a client made under another is
    not reused."""
    return tuple(sorted((k, v) for k, v in os.environ.items()
                        if k.startswith(_ENVIRONMENT_PREFIXES)))


@functools.lru_cache(maxsize=4096)  # (a store's client is made once per file and options)
def _located(path: str, options: tuple, environment: tuple) -> tuple[pafs.FileSystem, str]:
    """(``environment``: only a part of the cache's key; from_uri reads it itself.)"""
    name = scheme(path)
    split = urllib.parse.urlsplit(path)
    query = urllib.parse.urlencode([*urllib.parse.parse_qsl(split.query), *options])
    uri = _bare(path) + (f"?{query}" if query else "")
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as exc:
        if "Unrecognized filesystem type" not in str(exc):  # (an option it has no use for)
            raise failure(f"cannot reach {shown(path)} with storage options "
                          f"{sorted(dict(options))}", exc) from None
    except (OSError, pa.ArrowException) as exc:  # (HDFS without a Java runtime, say)
        raise failure(f"cannot reach {shown(path)}", exc) from None
    return _through_fsspec(path, name, dict(options))


def _through_fsspec(path: str, name: str, options: dict) -> tuple[pafs.FileSystem, str]:
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"pyarrow has no filesystem for {name}:// URIs, and fsspec (which "
                         f"may) is not installed: pip install 'batchfit[remote]'") from None
    try:
        filesystem = fsspec.filesystem(name, **options)
    except ImportError as exc:  # (fsspec knows the scheme; its package is missing)
        raise ValueError(f"cannot reach {shown(path)}: {redacted(first_line(exc))}") from None
    except (ValueError, TypeError, OSError) as exc:
        raise failure(f"cannot reach {shown(path)}", exc) from None
    inner = filesystem._strip_protocol(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), inner


def info(path: str) -> pafs.FileInfo:
    filesystem, inner = locate(path)
    try:
        return filesystem.get_file_info(inner)
    except (OSError, pa.ArrowException) as exc:
        raise failure(f"cannot read {shown(path)}", exc) from None


def exists(path: str) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    return info(path).type == pafs.FileType.Directory


_BUCKETED = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az")  # a path's first part: a bucket


def missing_bucket(path: str) -> str | None:
    """The bucket (or container) of a store's ``path``, as a URI, if it does not exist."""
    if scheme(path) not in _BUCKETED:
        return None
    root = f"{scheme(path)}://{locate(path)[1].strip('/').split('/')[0]}"
    return None if is_dir(root) else root


def not_found(what: str, path: str) -> str:
    """Why ``path`` is not there, in one line: its bucket is missing, or the key is."""
    bucket = missing_bucket(path)
    return f"{what} bucket does not exist: {bucket}" if bucket else \
        f"{what} not found: {shown(path)}"


def children(path: str) -> list[str]:
    """The files directly under the "directory" ``path`` (a prefix of a store), as URIs."""
    filesystem, inner = locate(path)
    try:
        found = filesystem.get_file_info(pafs.FileSelector(inner))
    except (OSError, pa.ArrowException) as exc:
        raise failure(f"cannot list {shown(path)}", exc) from None
    return sorted(join(path, os.path.basename(entry.path)) for entry in found
                  if entry.type == pafs.FileType.File)


def join(directory: str, name: str) -> str:
    """``name`` in the directory (or prefix) ``directory``."""
    if not is_remote(directory):
        return os.path.join(directory, name)
    return directory.rstrip("/") + "/" + name


def parent(path: str) -> str:
    """The directory (or prefix) that holds ``path``."""
    if not is_remote(path):
        return os.path.dirname(os.path.abspath(path))
    return path.rstrip("/").rpartition("/")[0]


def basename(path: str) -> str:
    return os.path.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def open_input_file(path: str):
    """A random-access reader of ``path`` (local: the path itself, which pyarrow opens)."""
    if not is_remote(path):
        return local_path(path)
    filesystem, inner = locate(path)
    return filesystem.open_input_file(inner)


def open_input_stream(path: str):
    """A sequential reader of ``path``, decompressed as its extension says (local: the
    path itself)."""
    if not is_remote(path):
        return local_path(path)
    filesystem, inner = locate(path)
    return filesystem.open_input_stream(inner, compression="detect")


def head(path: str, size: int) -> bytes:
    """The first ``size`` bytes of ``path``."""
    try:
        if not is_remote(path):
            with open(path, "rb") as handle:
                return handle.read(size)
        with open_input_file(path) as handle:
            return handle.read(min(size, handle.size()))
    except (OSError, pa.ArrowException) as exc:
        raise failure(f"cannot read {shown(path)}", exc) from None


def stamp(path: str) -> list:
    """What identifies a file's contents cheaply: [path, size, modification time in ns]."""
    if not is_remote(path):
        stat = os.stat(path)
        return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
    found = info(path)
    return [shown(path), found.size, found.mtime_ns]


def size(path: str) -> int:
    return os.stat(path).st_size if not is_remote(path) else info(path).size


def identity(path: str) -> tuple[str, str]:
    """(scheme, path in the store) of a remote path: what two names of one object share."""
    return scheme(path), locate(path)[1].rstrip("/")


def unlink(path: str):
    """Remove the file ``path`` (locally ``OSError`` if it cannot be)."""
    if is_remote(path):
        remove(path)
    else:
        os.unlink(path)


def remove(path: str):
    """Remove a file or a directory (a prefix and everything under it) if there."""
    filesystem, inner = locate(path)
    with contextlib.suppress(OSError, pa.ArrowException):
        found = filesystem.get_file_info(inner)
        if found.type == pafs.FileType.Directory:
            filesystem.delete_dir(inner)
        elif found.type == pafs.FileType.File:
            filesystem.delete_file(inner)


def read_bytes(path: str) -> bytes:
    """A whole file (``FileNotFoundError`` if it is not there)."""
    if not is_remote(path):
        with open(path, "rb") as handle:
            return handle.read()
    filesystem, inner = locate(path)
    if filesystem.get_file_info(inner).type == pafs.FileType.NotFound:
        raise FileNotFoundError(shown(path))
    with filesystem.open_input_stream(inner) as handle:
        return handle.read()


def write_whole(path: str, data: bytes):
    """Write ``path`` so that it is never seen half-written: locally a temporary name
    renamed into place; in a store one upload (an object appears when it completes)."""
    if is_remote(path):
        filesystem, inner = locate(path)
        with filesystem.open_output_stream(inner) as handle:
            handle.write(data)
        return
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


def names(directory: str) -> list[str]:
    """The names of the files directly in ``directory``."""
    if not is_remote(directory):
        return os.listdir(directory)
    return [basename(file) for file in children(directory)]


def split_paths(paths: list, options: dict[str, str] | None) -> tuple[list, dict[str, str]]:
    """A job's paths (None kept) without their URIs' queries, and the storage options:
    ``options`` over those of the queries."""
    bare, found = [], {}
    for path in paths:
        if path is None:
            bare.append(None)
            continue
        path, query = split(path)
        bare.append(path)
        found.update(query)
    return bare, {**found, **(options or {})}


def same_file(one: str, other: str) -> bool:
    """Whether two paths name one file (local: through links too)."""
    if is_remote(one) or is_remote(other):
        return is_remote(one) and is_remote(other) and identity(one) == identity(other)
    return os.path.realpath(local_path(one)) == os.path.realpath(local_path(other))
