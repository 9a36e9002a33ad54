"""Which files a dataset path names, and how each is read. A path is a file or a directory
of files; a file's format (Parquet, CSV or Arrow IPC) is the one asked for, else the one its
extension names, else the one its first bytes show, and a file whose first bytes show another
binary format is refused. A directory's data files must all be of one format, and no file
may appear twice under two names (its points would count twice). A path may be a URI of a
store (``storage``): a key, or a prefix standing for a directory. Nothing here opens a file
as data: ``sources`` does that."""

from __future__ import annotations

import os

from batchfit.io import storage

INPUT_FORMATS = ("auto", "parquet", "csv", "ipc")
EXTENSIONS = {"parquet": (".parquet", ".pq", ".parq"),
              "csv": (".csv", ".csv.gz", ".csv.bz2", ".csv.zst"),  # (pyarrow decompresses)
              "ipc": (".arrow", ".arrows", ".feather", ".ipc")}
LABELS = {"parquet": "Parquet", "csv": "CSV", "ipc": "Arrow IPC", "feather1": "Feather v1"}


def format_by_name(name: str) -> str | None:
    """The format a file's extension names (None: no known extension)."""
    lower = name.lower()
    return next((kind for kind, ends in EXTENSIONS.items() if lower.endswith(ends)), None)


def _format_by_content(file: str) -> str | None:
    """The format a file's first bytes show: Parquet ("PAR1"), an Arrow IPC file ("ARROW1")
    or stream (the continuation marker 0xFFFFFFFF); None for anything else (CSV has none)."""
    head = first_bytes(file)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):
        return "ipc"
    return "feather1" if head.startswith(b"FEA1") else None


def first_bytes(file: str) -> bytes:
    """A file's first 8 bytes (its magic number, if it has one)."""
    return storage.head(file, 8)


def file_format(file: str, input_format: str = "auto") -> str:
    """How ``file`` is read: ``input_format`` if given, else by its extension, else by its
    first bytes. A file whose first bytes show another binary format is refused."""
    check_input_format(input_format)
    named = input_format if input_format != "auto" else format_by_name(file)
    content = _format_by_content(file)
    kind = named or content
    if content == "feather1" and kind in ("ipc", "feather1"):
        return "feather1"  # (refused when opened, with what to do)
    if kind is None:
        raise ValueError(f"cannot tell the format of {file} from its name or its first bytes: "
                         "set input_format to parquet, csv or ipc")
    if content is not None and content != kind:
        said = "input_format says" if input_format != "auto" else "its name says"
        article = "an" if LABELS[content][0] in "AEIOU" else "a"
        raise ValueError(f"{file} is {article} {LABELS[content]} file (by its first bytes), not "
                         f"{LABELS[kind]} as {said}")
    return kind


def check_input_format(input_format: str):
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, got "
                         f"{input_format!r}")


def list_files(path: str, input_format: str = "parquet") -> list[str]:
    """The files of a dataset path: the file itself, or the files of a directory whose
    extension is ``input_format``'s (auto: any format's; names starting with . or _ are
    not data). The default, Parquet, is what batchfit's own outputs are."""
    check_input_format(input_format)
    remote = storage.is_remote(path)
    path = storage.local_path(path)
    if not storage.exists(path):
        raise ValueError(storage.not_found("input", path))
    if not storage.is_dir(path):
        return [path]
    kinds = list(EXTENSIONS) if input_format == "auto" else [input_format]
    names = [storage.basename(file) for file in storage.children(path)] if remote else \
        [name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name))]
    files = sorted(storage.join(path, name) for name in names
                   if format_by_name(name) in kinds and name[0] not in "._")
    if not files:
        patterns = ", ".join(f"*{end}" for kind in kinds for end in EXTENSIONS[kind])
        others = [LABELS[kind] for kind in kinds if kind != "parquet"]
        what = "Parquet files" if "parquet" in kinds else f"{others.pop(0)} files"
        if others:
            what += f" (nor {' or '.join(others)} files)"
        raise ValueError(f"no {what} ({patterns}) in directory {storage.shown(path)}")
    if remote:
        return files  # (a store's keys are its objects: no two name one)
    seen = {}
    for file in files:  # (two links to one file would count its every point twice)
        info = os.stat(file)
        first = seen.setdefault((info.st_dev, info.st_ino), file)
        if first != file:
            raise ValueError(f"directory {path} holds one file twice: "
                             f"{os.path.basename(first)} and {os.path.basename(file)} "
                             "(links to one file); its points would count twice")
    return files


def dataset_files(path: str, input_format: str = "auto") -> list[tuple[str, str]]:
    """(file, format) of every file of a dataset path. The files of a directory must be of
    one format (a CSV copy beside the Parquet original would count every point twice): a
    directory holding several is refused, unless ``input_format`` picks one."""
    files = [(file, file_format(file, input_format))
             for file in list_files(path, input_format)]
    kinds = sorted({kind for _, kind in files})
    if len(kinds) > 1:
        firsts = [next(file for file, k in files if k == kind) for kind in kinds]
        raise ValueError(f"directory {path} holds files of more than one format ("
                         + ", ".join(f"{LABELS[k]}: {os.path.basename(f)}"
                                     for k, f in zip(kinds, firsts))
                         + "): set input_format to read one of them")
    return files
