"""Corpora tokenised once and reopened as memory maps: a folder per (data path, split,
tokenizer) under the token cache, holding

    train.bin, val.bin   token ids, uint8 for up to 256 characters, else uint16
    tokenizer.json       the vocabulary
    meta.json            counts and the sources' fingerprint (path, size, mtime, inode and
                         ctime of each file)

    store = open_token_store(spec, Path(".cache/tokens"), read_chunks)
    store.train[1000:1064]                 # np.memmap: nothing is read until it is used

A store is trusted only whole: it is built in a temporary folder, meta.json written last, and
renamed into place, so a build killed halfway leaves nothing a later run would read. A source
whose size, mtime, inode or ctime changed makes the store stale, and it is rebuilt. Builders
of one store take turns on a lock file (torchrun's processes, or two runs at once): one
builds, the others wait and reuse it.

A build shows its progress through the `progress` argument the caller passes (utils/console.py
draws a bar); by default it shows nothing, so this module needs no display library.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenizer import CharacterSet, CharTokenizer, UnknownCharactersError, token_dtype

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
MAX_VOCABULARY = 1 << 16  # ids are stored as uint16

# read_chunks(on_read) streams the corpus text, calling on_read with each count of bytes read
ReadChunks = Callable[[Callable[[int], None]], Iterator[str]]
# progress(total_bytes, title): a context manager yielding the function a build calls with
# each count of bytes it reads
Progress = Callable[[int, str], contextlib.AbstractContextManager[Callable[[int], None]]]


class DataError(ValueError):
    """The corpus cannot be used for training."""


@contextlib.contextmanager
def no_progress(total_bytes: int, title: str) -> Iterator[Callable[[int], None]]:
    """A build that shows nothing."""
    yield lambda _: None


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds: the text of these sources, split, in this vocabulary."""

    data_path: str  # as the user gave it: names the store's folder
    sources: list[Path]
    text_field: str | None  # for JSONL sources
    train_split: float
    tokenizer: CharTokenizer | None  # None: the corpus's own characters

    def key(self) -> str:
        # the path as given, not its files: a file added to a folder makes the folder's store
        # stale (the fingerprint lists the files), not a second store
        identity = {"format": FORMAT_VERSION, "data_path": str(Path(self.data_path).resolve()),
                    "text_field": self.text_field, "train_split": self.train_split,
                    "vocabulary": self.tokenizer.chars if self.tokenizer else None}
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    def folder_name(self) -> str:
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.data_path).name).strip("._")
        return f"{readable or 'corpus'}-{self.key()}"

    def fingerprint(self) -> list[dict[str, Any]]:
        """Each source's path, size, modification time, inode and status-change time: what a
        stale store differs in. The last two catch what size and mtime miss: an edit of the
        same size whose mtime was set back (cp -p, rsync -t, touch -r), or another file moved
        into the path; no tool can set a ctime, and any write or rename moves it."""
        prints = []
        for path in self.sources:
            try:
                stat = path.stat()
            except OSError as error:
                raise DataError(f"cannot read data file {path}: {error.strerror}") from None
            prints.append({"path": str(path.resolve()), "size": stat.st_size,
                           "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
                           "ctime_ns": stat.st_ctime_ns})
        return prints


@dataclass(frozen=True)
class TokenStore:
    path: Path
    sources: list[Path]
    tokenizer: CharTokenizer
    train: np.ndarray  # memmaps of the token ids
    val: np.ndarray
    meta: dict[str, Any]
    reused: bool  # False: built by this call


def open_token_store(spec: StoreSpec, cache_dir: Path, read_chunks: ReadChunks,
                     progress: Progress = no_progress) -> TokenStore:
    """The store for spec: reused when it matches the sources, built (atomically) when it is
    missing or stale, showing its reading through progress."""
    folder = cache_dir / spec.folder_name()
    fingerprint = spec.fingerprint()
    store = _open_if_current(folder, spec, fingerprint)
    if store is not None:
        return store
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the token cache {cache_dir}: {error.strerror}; pass "
                        "--token-cache a writable folder") from None
    with _lock(cache_dir / f"{folder.name}.lock"):
        store = _open_if_current(folder, spec, fingerprint)  # built while this process waited
        if store is not None:
            return store
        _build(folder, spec, fingerprint, read_chunks, progress)
    store = _open_if_current(folder, spec, fingerprint, reused=False)
    assert store is not None, f"{folder} was just built"
    return store


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def _open_if_current(folder: Path, spec: StoreSpec, fingerprint: list[dict[str, Any]],
                     reused: bool = True) -> TokenStore | None:
    """The store in folder if it is whole and made from these very sources, else None."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION or meta.get("sources") != fingerprint:
            return None
        tokenizer = CharTokenizer(json.loads(
            (folder / TOKENIZER_FILE).read_text(encoding="utf-8"))["chars"])
        dtype = token_dtype(tokenizer.vocab_size)
        splits = {name: _map(folder / file, dtype, meta["tokens"][name])
                  for name, file in SPLIT_FILES.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(split is None for split in splits.values()):
        return None
    return TokenStore(folder, spec.sources, tokenizer, splits["train"], splits["val"], meta,
                      reused)


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray | None:
    """The file's ids as a read-only memmap, or None if its size is not count ids."""
    if path.stat().st_size != count * dtype.itemsize:
        return None
    if count == 0:
        return np.zeros(0, dtype=dtype)  # an empty file cannot be mapped
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _build(folder: Path, spec: StoreSpec, fingerprint: list[dict[str, Any]],
           read_chunks: ReadChunks, progress: Progress) -> None:
    """Tokenise into a temporary folder, then swap it in for folder; the caller holds the
    lock, so leftovers of a killed build can go."""
    for leftover in folder.parent.glob(f"{folder.name}.*-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    building = folder.parent / f"{folder.name}.building-{os.getpid()}"
    building.mkdir()
    started = time.perf_counter()
    try:
        total_bytes = sum(entry["size"] for entry in fingerprint)
        # the sources are read twice: once for the vocabulary, once for the ids
        with progress(2 * total_bytes, f"tokenising {spec.data_path}") as on_read:
            characters = CharacterSet()
            for chunk in read_chunks(on_read):
                characters.add(chunk)
            tokenizer = _vocabulary(spec, characters)
            cut = int(characters.count * spec.train_split)
            _write_ids(building, tokenizer, read_chunks(on_read), cut)
        (building / TOKENIZER_FILE).write_text(tokenizer.to_json() + "\n", encoding="utf-8")
        meta = {"format": FORMAT_VERSION, "data_path": spec.data_path, "sources": fingerprint,
                "text_field": spec.text_field, "train_split": spec.train_split,
                "characters": characters.count, "vocab_size": tokenizer.vocab_size,
                "dtype": str(token_dtype(tokenizer.vocab_size)),
                "tokens": {"train": cut, "val": characters.count - cut},
                "build_seconds": round(time.perf_counter() - started, 3)}
        _write_synced(building / META_FILE, json.dumps(meta, indent=2).encode() + b"\n")
        _swap_in(building, folder)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _vocabulary(spec: StoreSpec, characters: CharacterSet) -> CharTokenizer:
    if characters.count == 0:
        raise DataError(f"--data-path {spec.data_path} holds no text")
    if spec.tokenizer is not None:
        unknown = spec.tokenizer.unknown_characters(characters.chars)
        if unknown:
            raise UnknownCharactersError(
                f"{spec.data_path}: {spec.tokenizer.describe_unknown(unknown)} of the run it "
                "continues, which cannot encode them; use text within its vocabulary"
            )
        return spec.tokenizer
    if len(characters.chars) > MAX_VOCABULARY:
        raise DataError(f"{spec.data_path} has {len(characters.chars):,} distinct characters; "
                        f"the token store holds at most {MAX_VOCABULARY:,}")
    return CharTokenizer(characters.chars)


def _write_ids(folder: Path, tokenizer: CharTokenizer, chunks: Iterator[str], cut: int) -> None:
    """The first `cut` ids into train.bin, the rest into val.bin."""
    written = 0
    with open(folder / SPLIT_FILES["train"], "wb") as train, \
            open(folder / SPLIT_FILES["val"], "wb") as val:
        for chunk in chunks:
            ids = tokenizer.encode_array(chunk)
            to_train = max(0, min(len(ids), cut - written))
            train.write(ids[:to_train].tobytes())
            val.write(ids[to_train:].tobytes())
            written += len(ids)
        for handle in (train, val):
            handle.flush()
            os.fsync(handle.fileno())


def _write_synced(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _swap_in(building: Path, folder: Path) -> None:
    """Replace folder by building; a reader holding the old store's maps keeps its files."""
    if folder.exists():
        stale = folder.parent / f"{folder.name}.stale-{os.getpid()}"
        os.replace(folder, stale)
        os.replace(building, folder)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(building, folder)
