"""The training corpus: text from a file, a folder, a glob or a JSONL file (each may be
gzipped), tokenised once into a cached token store, split, and drawn as batches of windows:
at random, or every window once per epoch.

    corpus = load_corpus("books/", "text", train_split=0.9, cache_dir=".cache/tokens",
                         block_size=256)             # built on first use, memory-mapped after
    x, y = BatchSampler(corpus.splits.train, block_size=256, batch_size=64, seed=1).next_batch()

Report on a corpus, and build its store: python train.py --describe-data --data-path books/
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from token_store import DataError, Progress, StoreSpec, TokenStore, no_progress, open_token_store
from tokenizer import CharTokenizer

# between documents: the files of a folder or glob, the records of a JSONL file
DOCUMENT_SEPARATOR = "\n\n"
READ_BYTES = 1 << 20  # files are read in blocks of this size
CHUNK_CHARACTERS = 1 << 21  # text is tokenised in chunks of about this many characters: small
# enough that their temporary arrays are reused rather than mapped afresh for every chunk
TEXT_SUFFIXES = (".txt", ".txt.gz")  # what a folder contributes


def find_sources(data_path: str) -> list[Path]:
    """The files data_path names, in reading order: the file itself, every *.txt (or
    *.txt.gz) under a folder, sorted by path, or the files a glob matches, sorted."""
    path = Path(data_path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_text_file(p))
        if not files:
            raise DataError(f"folder {path} holds no .txt (or .txt.gz) files; add some, or "
                            "pass --data-path a file, a glob or a .jsonl file")
        return files
    if path.exists():
        return [path]
    if set("*?[") & set(data_path):
        files = sorted(Path(p) for p in glob.glob(data_path, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no file matches --data-path {data_path}")
        return files
    raise DataError(f"data file {path} does not exist; pass --data-path a text file, a folder "
                    "of .txt files, a glob or a .jsonl file")


def is_text_file(path: Path) -> bool:
    return not path.name.startswith(".") and path.name.endswith(TEXT_SUFFIXES)


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def text_chunks(paths: Sequence[Path], text_field: str,
                on_read: Callable[[int], None] = lambda _: None) -> Iterator[str]:
    """The corpus as pieces of about CHUNK_CHARACTERS: every file's text (every record's
    text_field for JSONL), with DOCUMENT_SEPARATOR between non-empty documents. on_read gets
    the number of bytes read from disk as reading goes."""
    pending: list[str] = []
    pending_size = 0
    for piece in _document_pieces(paths, text_field, on_read):
        pending.append(piece)
        pending_size += len(piece)
        if pending_size >= CHUNK_CHARACTERS:
            yield "".join(pending)
            pending, pending_size = [], 0
    if pending:
        yield "".join(pending)


def _document_pieces(paths: Sequence[Path], text_field: str,
                     on_read: Callable[[int], None]) -> Iterator[str]:
    started = False
    for path in paths:
        documents = (_jsonl_documents(path, text_field, on_read) if is_jsonl(path)
                     else [_file_pieces(path, on_read)])
        for document in documents:
            opened = False
            for piece in document:
                if not piece:
                    continue
                if started and not opened:
                    yield DOCUMENT_SEPARATOR
                started = opened = True
                yield piece


def _open(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(the stream to read, the file on disk), which differ for gzip."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror}") from None
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), raw
    return raw, raw


def _file_pieces(path: Path, on_read: Callable[[int], None]) -> Iterator[str]:
    """A text file's UTF-8 text, block by block."""
    stream, raw = _open(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    decoded = 0  # bytes of the (decompressed) text before this block
    last_position = 0
    with raw, stream:
        while True:
            try:
                block = stream.read(READ_BYTES)
            except (OSError, EOFError, zlib.error) as error:
                raise DataError(f"cannot read data file {path}: {error}") from None
            try:
                yield decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                position = decoded + error.start
                bad = block[error.start:error.start + 1] if block else b""
                raise DataError(
                    f"data file {path} is not UTF-8 text (byte {position}: {bad!r}); convert "
                    "it, e.g. iconv -t UTF-8"
                ) from None
            on_read(raw.tell() - last_position)
            last_position = raw.tell()
            if not block:
                return
            decoded += len(block)


def _jsonl_documents(path: Path, text_field: str,
                     on_read: Callable[[int], None]) -> Iterator[list[str]]:
    """Each record's text_field, one document per line; blank lines are skipped."""
    stream, raw = _open(path)
    last_position = 0
    with raw, stream:
        try:
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    yield [_record_text(line, number, path, text_field)]
                if number % 1024 == 0:
                    on_read(raw.tell() - last_position)
                    last_position = raw.tell()
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"cannot read data file {path}: {error}") from None
        on_read(raw.tell() - last_position)


def _record_text(line: bytes, number: int, path: Path, text_field: str) -> str:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text; convert the file, e.g. iconv -t UTF-8") \
            from None
    except ValueError as error:
        raise DataError(f"{where} is not JSON ({error.args[0].split(':')[0]})") from None
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else "none: not an object"
        raise DataError(f"{where} has no field {text_field!r} (its fields: {fields}); name the "
                        "text's field with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
    return text


@dataclass(frozen=True)
class Splits:
    train: np.ndarray  # (N_train,) token ids, uint8 or uint16; a memmap of the token store
    val: np.ndarray  # (N_val,)


def split_ids(ids: np.ndarray, train_fraction: float, block_size: int) -> Splits:
    """First train_fraction of the ids for training, the rest for validation."""
    cut = int(len(ids) * train_fraction)
    splits = Splits(train=ids[:cut], val=ids[cut:])
    check_splits(splits, block_size, train_fraction)
    return splits


def check_splits(splits: Splits, block_size: int, train_fraction: float) -> None:
    """Each split must hold at least one window of block_size + 1 tokens."""
    needed = block_size + 1
    total = len(splits.train) + len(splits.val)
    for name, part in (("train", splits.train), ("val", splits.val)):
        if len(part) < needed:
            raise DataError(
                f"the {name} split has {len(part)} tokens but block_size={block_size} needs at "
                f"least {needed} ({total} in all, train_split={train_fraction}); use a longer "
                f"text or a smaller --block-size"
            )


def windows_at(data: np.ndarray, starts: torch.Tensor, length: int) -> torch.Tensor:
    """data[start:start + length] for each start, as one (len(starts), length) int64 tensor;
    reading a memmap touches only those windows."""
    index = starts.numpy()[:, None] + np.arange(length)
    return torch.from_numpy(data[index].astype(np.int64))


SAMPLINGS = ("random", "epochs")


class BatchSampler:
    """(x, y) windows from one split; its own generator makes batches reproducible.

    sampling="random" draws each window's start anywhere in the split, independently
    (nanoGPT's get_batch). sampling="epochs" serves every non-overlapping window once per
    epoch, from a random offset and in a random order, so each token is a target once per
    epoch, which ends the default run at a lower val loss for the same steps (BENCHMARKS.md).
    A batch that outlasts an epoch takes the rest from the next one.
    An epoch's order takes 4 bytes per window: 31 MB for a billion tokens at block 128.
    """

    def __init__(
        self,
        data: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        sampling: str = "random",
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, not {sampling!r}")
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_order: torch.Tensor | None = None  # this epoch's windows, by index
        self.epoch_offset = 0  # where its window 0 starts
        self.epoch_generator_state: torch.Tensor | None = None  # the state that drew them
        self.position = 0  # windows of this epoch already served

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (batch_size, block_size) int64 on the device."""
        if self.sampling == "epochs":
            starts = self._starts_from_epochs()
        else:
            starts = torch.randint(self.valid_starts, (self.batch_size,),
                                   generator=self.generator)
        windows = windows_at(self.data, starts, self.block_size + 1)  # (B, block_size + 1)
        if self.device.type == "cuda":
            # pinned host memory lets the copy overlap the previous step's GPU work
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1], windows[:, 1:]

    @property
    def valid_starts(self) -> int:
        """Starts 0 .. valid_starts - 1 leave room for a window of block_size + 1 tokens."""
        return len(self.data) - self.block_size

    def _starts_from_epochs(self) -> torch.Tensor:
        parts, wanted = [], self.batch_size
        while wanted:
            if self.epoch_order is None or self.position == len(self.epoch_order):
                self._begin_epoch()
            assert self.epoch_order is not None
            part = self.epoch_order[self.position:self.position + wanted]
            self.position += len(part)
            wanted -= len(part)
            parts.append(self.epoch_offset + part.long() * self.block_size)
        return torch.cat(parts)

    def _begin_epoch(self) -> None:
        self.epoch_generator_state = self.generator.get_state()
        self.epoch_offset = int(torch.randint(min(self.block_size, self.valid_starts), (1,),
                                              generator=self.generator))
        count = -(-(self.valid_starts - self.epoch_offset) // self.block_size)  # all that fit
        # the same order as int64 (torch draws it alike), in half the memory
        dtype = torch.int32 if count < 2**31 else torch.int64
        self.epoch_order = torch.randperm(count, generator=self.generator, dtype=dtype)
        self.position = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"generator": self.generator.get_state()}
        if self.epoch_generator_state is not None:  # the epoch is drawn again on load
            state["epoch_generator"] = self.epoch_generator_state
            state["epoch_position"] = torch.tensor(self.position)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "epoch_generator" in state:
            self.generator.set_state(state["epoch_generator"])
            self._begin_epoch()
            self.position = int(state["epoch_position"])
        self.generator.set_state(state["generator"])


@dataclass(frozen=True)
class Corpus:
    tokenizer: CharTokenizer
    splits: Splits
    store: TokenStore


def load_corpus(data_path: str, text_field: str, train_split: float, cache_dir: str,
                block_size: int, tokenizer: CharTokenizer | None = None,
                progress: Progress = no_progress) -> Corpus:
    """The corpus at data_path through its token store (built on first use, its reading shown
    through progress); with a tokenizer, its vocabulary must cover the text (fine-tuning)."""
    sources = find_sources(data_path)
    spec = StoreSpec(data_path, sources, text_field if any(map(is_jsonl, sources)) else None,
                     train_split, tokenizer)
    store = open_token_store(spec, Path(cache_dir),
                             lambda on_read: text_chunks(sources, text_field, on_read), progress)
    splits = Splits(store.train, store.val)
    check_splits(splits, block_size, train_split)
    return Corpus(store.tokenizer, splits, store)


def describe(corpus: Corpus) -> Iterable[str]:
    """The corpus report: what a run on it trains on."""
    store = corpus.store
    train, val = len(corpus.splits.train), len(corpus.splits.val)
    source_bytes = sum(entry["size"] for entry in store.meta["sources"])
    yield f"sources:    {len(store.sources)} file(s), {source_bytes:,} bytes"
    yield f"characters: {train + val:,}"
    yield f"vocabulary: {corpus.tokenizer.vocab_size} characters ({store.train.dtype} ids)"
    yield f"train:      {train:,} tokens"
    yield f"val:        {val:,} tokens"
    how = "reused" if store.reused else f"built now in {store.meta['build_seconds']:.2f} s"
    yield f"store:      {store.path} ({how})"

