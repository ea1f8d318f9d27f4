"""Copies of run storage on a node: a model folder in an object store read through a local copy
(`local_copy`), and a local folder put into run storage for every node (`publish`).

A node keeps its copies in its temp dir (``raydpo-storage-cache/``), one per location, keyed by
the files' sizes and times (a folder rewritten in place gets a fresh copy, the old one goes);
the processes of a node that ask at once wait for one download. Names and I/O are
`raydpo.storage`'s; torch-free and Ray-free.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from raydpo.storage import (COPY_DONE, _info, copy_tree, exists, filesystem, is_file, is_remote, join, name, parent,
                            read_bytes, remove, walk_files, write_text)

TOKENIZER_FILES = ("token", "vocab", "merges", "chat_template", "special_tokens", "added_tokens", "config.json")


def is_tokenizer_file(rel: str) -> bool:
    """A top-level file a tokenizer loads from a model folder (its config.json too: the tokenizer
    class may be named there), not the weights."""
    return "/" not in rel and any(t in rel for t in TOKENIZER_FILES)


def local_copy(loc: str | Path, only: Callable[[str], bool] | None = None) -> str:
    """A local path with the folder's (or file's) content: a local location itself; a remote one
    downloaded once per node into the temp dir, keyed by its location and its files' sizes and
    times (a folder rewritten in place gets a fresh copy), complete or not used. ``only``: the
    relative names to fetch (e.g. `is_tokenizer_file`: a tokenizer without a 13 GB model). The
    processes of a node that ask at once wait for one download (a file lock), not download
    each."""
    s = str(loc)
    if not is_remote(s):
        return filesystem(s)[1]
    single = is_file(s)
    if single:
        info = _info(s)
        files = {name(s): (int(info.size or 0), int(info.mtime_ns or 0))}
    else:
        files = {k: v for k, v in walk_files(s).items() if only is None or only(k)}
        if not files:
            raise FileNotFoundError(f"{s}: no such folder in storage")
    key = hashlib.sha256(json.dumps([s, sorted(files.items())]).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / "raydpo-storage-cache" / f"{name(s)}-{key}"
    found = str(out / name(s)) if single else str(out)
    tag = s if only is None else f"{s} (some files)"  # a partial copy never replaces a whole one
    if (out / COPY_DONE).exists():
        return found
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not (out / COPY_DONE).exists():
            _download(s, out, None if single or only is None else sorted(files), tag, single)
    _drop_older_copies(out, tag)
    return found


def _download(loc: str, out: Path, names: list[str] | None, tag: str, single: bool) -> None:
    """``loc`` (a ``single`` file, a folder, or ``names`` of a folder) into ``out``, whole or not at all."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if single:
            (tmp / name(loc)).write_bytes(read_bytes(loc))
        elif names is not None:
            for n in names:
                (tmp / n).write_bytes(read_bytes(join(loc, n)))
        else:
            copy_tree(loc, str(tmp))
        (tmp / COPY_DONE).write_text(tag)
        tmp.chmod(0o755)  # mkdtemp makes it private; other users' processes on the node read it
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_older_copies(keep: Path, tag: str) -> None:
    """A node keeps one copy per remote location: the copies of its earlier content go (a 7B
    merged base is 13 GB; a process that loaded one holds it in memory, not on disk)."""
    for other in keep.parent.glob(f"{keep.name.rsplit('-', 1)[0]}-*"):
        done = other / COPY_DONE
        if other != keep and done.is_file() and done.read_text() == tag:
            shutil.rmtree(other, ignore_errors=True)


def publish(local: str | Path, loc: str | Path) -> str:
    """Put a finished local folder (the tiny model built on the driver) at ``loc`` in run storage
    once, for every node to read: done when ``loc`` holds its completion marker (written last),
    otherwise (re)copied. Returns ``loc``."""
    loc = str(loc)
    done = join(loc, COPY_DONE)
    if exists(done):
        return loc
    if is_remote(loc):
        remove(loc)
        copy_tree(str(local), loc)
        write_text(done, str(local))
        return loc
    tmp = join(parent(loc), f".{name(loc)}.publishing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(local, tmp)
    Path(tmp, COPY_DONE).write_text(str(local))
    if os.path.isdir(loc):  # there, but not a finished publish (no marker): replaced
        shutil.rmtree(loc, ignore_errors=True)
    try:
        os.replace(tmp, loc)
    except OSError:  # another driver published the same folder first (the same build)
        shutil.rmtree(tmp, ignore_errors=True)
        if not exists(done):
            raise
    return loc
