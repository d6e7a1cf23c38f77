from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from data import (
    BatchSampler,
    DataError,
    find_sources,
    load_corpus,
    split_ids,
    text_chunks,
)
from tests.conftest import PROJECT_ROOT
from tokenizer import CharTokenizer, UnknownCharactersError


def corpus_text(data_path: Path | str, text_field: str = "text") -> str:
    return "".join(text_chunks(find_sources(str(data_path)), text_field))


def load(data_path: Path | str, cache: Path, block_size: int = 4, **options):
    return load_corpus(str(data_path), options.pop("text_field", "text"),
                       options.pop("train_split", 0.9), str(cache), block_size, **options)


def corpus_of(corpus) -> str:
    ids = np.concatenate([corpus.splits.train, corpus.splits.val])
    return corpus.tokenizer.decode(ids.tolist())


# --- sources -------------------------------------------------------------------------------

def test_a_folder_is_its_text_files_sorted_and_joined_by_a_blank_line(tmp_path):
    folder = tmp_path / "books"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "two.txt").write_text("second")
    (folder / "a.txt").write_text("first\n")
    (folder / "c.txt.gz").write_bytes(gzip.compress(b"third"))
    (folder / "notes.md").write_text("not text")
    (folder / ".hidden.txt").write_text("hidden")
    (folder / "empty.txt").write_text("")
    assert [p.relative_to(folder).as_posix() for p in find_sources(str(folder))] == [
        "a.txt", "b/two.txt", "c.txt.gz", "empty.txt"]
    # an empty file adds no blank line
    assert corpus_text(folder) == "first\n\n\nsecond\n\nthird"


def test_a_glob_reads_the_files_it_matches_in_sorted_order(tmp_path):
    for name, text in (("act2.txt", "two"), ("act1.txt", "one"), ("other.md", "no")):
        (tmp_path / name).write_text(text)
    assert corpus_text(tmp_path / "act*.txt") == "one\n\ntwo"


def test_jsonl_records_are_documents_of_the_text_field(tmp_path):
    path = tmp_path / "dump.jsonl"
    records = [{"body": "alpha", "id": 1}, {"body": "beta\nline", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert corpus_text(path, text_field="body") == "alpha\n\nbeta\nline"


@pytest.mark.parametrize("name", ["text.txt.gz", "dump.jsonl.gz"])
def test_gzip_files_read_as_what_they_hold(tmp_path, name):
    plain = "To be, or not to be\n" * 50
    payload = json.dumps({"text": plain}) if "jsonl" in name else plain
    (tmp_path / name).write_bytes(gzip.compress(payload.encode()))
    assert corpus_text(tmp_path / name) == plain


def test_text_is_streamed_in_chunks_that_join_to_the_whole(tmp_path, monkeypatch):
    import data

    monkeypatch.setattr(data, "READ_BYTES", 7)
    monkeypatch.setattr(data, "CHUNK_CHARACTERS", 10)
    text = "ünïcödé across block borders ☃ " * 20
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    chunks = list(text_chunks([tmp_path / "a.txt"], "text"))
    assert len(chunks) > 10 and "".join(chunks) == text


@pytest.mark.parametrize(
    ("files", "data_path", "message"),
    [
        ({}, "missing.txt", r"data file .*missing.txt does not exist; pass --data-path"),
        ({}, "nothing*.txt", r"no file matches --data-path .*nothing\*.txt"),
        ({"sub/notes.md": b"x"}, "sub", r"folder .*sub holds no .txt \(or .txt.gz\) files"),
        ({"empty.txt": b""}, "empty.txt", r"--data-path .*empty.txt holds no text"),
        ({"blank.jsonl": b"\n\n"}, "blank.jsonl", r"holds no text"),
        ({"latin.txt": b"caf\xe9 au lait"}, "latin.txt",
         r"latin.txt is not UTF-8 text \(byte 3: b'\\xe9'\); convert it"),
        ({"bad.jsonl": b'{"text": "ok"}\n{"text": oops}\n'}, "bad.jsonl",
         r"bad.jsonl line 2 is not JSON \(Expecting value"),
        ({"field.jsonl": b'{"text": "ok"}\n\n{"body": "x", "id": 3}\n'}, "field.jsonl",
         r"field.jsonl line 3 has no field 'text' \(its fields: body, id\); name the text's "
         r"field with --text-field"),
        ({"kind.jsonl": b'{"text": 5}\n'}, "kind.jsonl", r"line 1: field 'text' is int, not text"),
        ({"broken.txt.gz": b"not gzip at all"}, "broken.txt.gz",
         r"cannot read data file .*broken.txt.gz"),
    ],
    ids=["missing", "glob-matches-nothing", "folder-without-text", "empty-file",
         "jsonl-of-blank-lines", "not-utf8", "jsonl-not-json", "jsonl-missing-field",
         "jsonl-field-not-text", "not-gzip"],
)
def test_each_unusable_corpus_is_one_data_error(tmp_path, files, data_path, message):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        load(tmp_path / data_path, tmp_path / "cache")
    stores = [p for p in (tmp_path / "cache").glob("*") if not p.name.endswith(".lock")]
    assert stores == []  # nothing half-built is left to trust


def test_a_bad_corpus_is_one_line_and_exit_2_from_the_command_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    code = train.main(["--data-path", str(tmp_path / "bad.jsonl"),
                       "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'bad.jsonl'} line 2 is not JSON (Expecting value)"]
    assert not (tmp_path / "runs").exists()


# --- the token store ------------------------------------------------------------------------

def test_the_store_holds_the_text_split_by_characters(tmp_path, corpus_file):
    corpus = load(corpus_file, tmp_path / "cache")
    text = corpus_file.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    assert corpus.tokenizer.chars == CharTokenizer.from_text(text).chars
    assert isinstance(corpus.splits.train, np.memmap) and corpus.splits.train.dtype == np.uint8
    assert corpus.tokenizer.decode(corpus.splits.train.tolist()) == text[:cut]
    assert corpus.tokenizer.decode(corpus.splits.val.tolist()) == text[cut:]
    meta = corpus.store.meta
    assert meta["characters"] == len(text) and meta["tokens"] == {"train": cut,
                                                                    "val": len(text) - cut}


def test_a_vocabulary_over_256_characters_is_stored_as_uint16(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    corpus = load(tmp_path / "wide.txt", tmp_path / "cache")
    assert corpus.splits.train.dtype == np.uint16 and corpus.tokenizer.vocab_size == 300
    assert corpus_of(corpus) == text


def test_the_store_is_reused_until_the_source_changes(tmp_path, corpus_file):
    cache = tmp_path / "cache"
    first = load(corpus_file, cache)
    assert not first.store.reused
    assert load(corpus_file, cache).store.reused
    # same size, new content: the write moves the mtime
    text = corpus_file.read_text(encoding="utf-8")
    corpus_file.write_text(text.replace("HAMLET", "HAMLEt"), encoding="utf-8")
    changed = load(corpus_file, cache)
    assert not changed.store.reused and "t" in changed.tokenizer.chars
    # only the mtime
    stat = corpus_file.stat()
    os.utime(corpus_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not load(corpus_file, cache).store.reused
    # same size, new content, and the mtime set back as cp -p or rsync -t leave it
    stat = corpus_file.stat()
    corpus_file.write_text(text.replace("HAMLET", "HAMLEx"), encoding="utf-8")
    os.utime(corpus_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    restored = load(corpus_file, cache)
    assert not restored.store.reused and "x" in restored.tokenizer.chars
    # the size
    corpus_file.write_text(text + "more", encoding="utf-8")
    grown = load(corpus_file, cache)
    assert not grown.store.reused and corpus_of(grown) == text + "more"
    assert load(corpus_file, cache).store.reused
    # a rebuilt store replaces the stale one: one folder per source
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


def test_a_file_added_to_a_folder_rebuilds_its_store(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("abc " * 20)
    load(folder, tmp_path / "cache")
    (folder / "b.txt").write_text("xyz " * 20)
    corpus = load(folder, tmp_path / "cache")
    assert not corpus.store.reused and corpus_of(corpus) == "abc " * 20 + "\n\n" + "xyz " * 20
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_memmap_batches_equal_in_memory_batches(tmp_path):
    """The store changes where the ids live, not which windows a seed draws: the same seed
    gives the batches that indexing the encoded text in memory gives."""
    text = (PROJECT_ROOT / "input.txt").read_text(encoding="utf-8")
    corpus = load(PROJECT_ROOT / "input.txt", tmp_path / "cache", block_size=64)
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text))
    in_memory = ids[:int(len(ids) * 0.9)]
    stored = BatchSampler(corpus.splits.train, block_size=64, batch_size=8, seed=5)
    generator = torch.Generator().manual_seed(5)
    for _ in range(5):
        x, y = stored.next_batch()
        starts = torch.randint(len(in_memory) - 64, (8,), generator=generator)
        windows = in_memory[starts[:, None] + torch.arange(65)]
        assert torch.equal(x, windows[:, :-1]) and torch.equal(y, windows[:, 1:])


KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import data
import token_store as store
from data import load_corpus
from tokenizer import CharTokenizer

point = sys.argv[1]
if point == "mid-ids":
    # small chunks, and death while encoding the third: train.bin is half written
    data.READ_BYTES = data.CHUNK_CHARACTERS = 1000
    encode, calls = CharTokenizer.encode_array, []
    def dying_encode(self, text):
        calls.append(text)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(self, text)
    CharTokenizer.encode_array = dying_encode
else:
    def dying_swap(building, folder):
        if point == "between-renames":
            os.replace(folder, folder.parent / (folder.name + ".stale-1"))
        os.kill(os.getpid(), signal.SIGKILL)
    store._swap_in = dying_swap
load_corpus(sys.argv[2], "text", 0.9, sys.argv[3], 4)
"""


@pytest.mark.parametrize("point", ["mid-ids", "before-rename", "between-renames"])
def test_a_tokenisation_killed_by_sigkill_leaves_nothing_trusted(tmp_path, corpus_file, point):
    cache = tmp_path / "cache"
    if point == "between-renames":
        load(corpus_file, cache)  # a store to replace
        corpus_file.write_text(corpus_file.read_text() + "changed")
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(PROJECT_ROOT)))
    result = subprocess.run([sys.executable, str(script), point, str(corpus_file), str(cache)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    corpus = load(corpus_file, cache)
    assert not corpus.store.reused  # rebuilt, not trusted
    assert corpus_of(corpus) == corpus_file.read_text()
    leftovers = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [corpus.store.path.name]  # the rebuild swept the killed build's files


def test_processes_building_one_store_take_turns(tmp_path, corpus_file):
    """Like torchrun's processes: they start together, one builds and the others reuse."""
    env = {"CHARGPT_TOKEN_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "--describe-data", "--data-path",
               str(corpus_file)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, **env}) for _ in range(3)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0]
    assert sum("(built now in" in output for output in outputs) == 1
    assert sum("(reused)" in output for output in outputs) == 2


def test_the_corpus_report_names_sizes_and_the_store(tmp_path, corpus_file, capsys, monkeypatch):
    monkeypatch.setenv("CHARGPT_TOKEN_CACHE", str(tmp_path / "cache"))
    describe = ["--describe-data", "--data-path", str(corpus_file)]
    assert train.main([*describe, "--runs-dir", str(tmp_path / "runs")]) == 0
    text = corpus_file.read_text()
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["characters"].strip() == f"{len(text):,}"
    assert lines["train"].strip() == f"{int(len(text) * 0.9):,} tokens"
    assert lines["vocabulary"].strip().startswith(f"{len(set(text))} characters")
    assert str(tmp_path / "cache") in lines["store"] and "(built now in" in lines["store"]
    assert not (tmp_path / "runs").exists()  # a report, not a run
    assert train.main(describe) == 0
    assert "(reused)" in capsys.readouterr().out


def test_a_fixed_vocabulary_refuses_text_outside_it(tmp_path, corpus_file):
    corpus_file.write_text(corpus_file.read_text() + "né☃")
    tokenizer = CharTokenizer.from_text("HAMLETOPHELIAHORATIO.\nTo be, or not to be, that is "
                                        "the question 0123456")
    with pytest.raises(UnknownCharactersError,
                       match=r"2 character\(s\) outside the vocabulary: 'é', '☃' of the run "
                             r"it continues"):
        load(corpus_file, tmp_path / "cache", tokenizer=tokenizer)


# --- split and batches ----------------------------------------------------------------------

def test_split_keeps_order_and_fraction():
    splits = split_ids(np.arange(100), train_fraction=0.9, block_size=8)
    assert np.array_equal(splits.train, np.arange(90))
    assert np.array_equal(splits.val, np.arange(90, 100))


def test_text_too_short_for_the_block_size_names_the_split(tmp_path):
    with pytest.raises(DataError, match=r"val split has 10 tokens but block_size=16 needs at "
                                        r"least 17"):
        split_ids(np.arange(100), train_fraction=0.9, block_size=16)
    (tmp_path / "short.txt").write_text("x" * 100)
    with pytest.raises(DataError, match=r"val split has 10 tokens"):
        load(tmp_path / "short.txt", tmp_path / "cache", block_size=16)


def test_batches_are_shifted_windows_of_the_data():
    data = np.arange(1000, dtype=np.uint16)
    x, y = BatchSampler(data, block_size=8, batch_size=5, seed=0).next_batch()
    assert x.shape == y.shape == (5, 8)
    assert x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 7, dtype=torch.long))  # contiguous
    assert int(y.max()) < 1000 and int(x.min()) >= 0


def test_batches_are_reproducible_under_the_seed():
    data = np.arange(1000, dtype=np.uint16)
    first = [BatchSampler(data, 8, 4, seed=3).next_batch()[0] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    other = BatchSampler(data, 8, 4, seed=4).next_batch()[0]
    assert not torch.equal(first[0], other)


def test_epoch_sampling_serves_every_window_once_per_epoch():
    """Each epoch's windows are the non-overlapping ones from one offset, each served once,
    and a batch that outlasts an epoch takes the rest from the next."""
    data = np.arange(104, dtype=np.uint16)  # 96 valid starts at block 8: 12 windows an epoch
    sampler = BatchSampler(data, block_size=8, batch_size=5, seed=1, sampling="epochs")
    starts = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(12)])  # 60 = 5 epochs
    assert sampler.epoch_order is not None and len(sampler.epoch_order) == 12
    for epoch in starts.split(12):
        offset = int(epoch.min())
        assert 0 <= offset < 8
        assert sorted(epoch.tolist()) == list(range(offset, 96, 8))  # all of them, once
    assert len({int(epoch.min()) for epoch in starts.split(12)}) > 1  # offsets differ
    assert any(not torch.equal(epoch, epoch.sort().values) for epoch in starts.split(12))


def test_epoch_sampling_fills_a_batch_larger_than_an_epoch():
    data = np.arange(30, dtype=np.uint16)  # 22 valid starts at block 8: 2 or 3 windows
    x, y = BatchSampler(data, 8, 16, seed=0, sampling="epochs").next_batch()
    assert x.shape == y.shape == (16, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and int(y.max()) < 30


@pytest.mark.parametrize("sampling", ["random", "epochs"])
def test_sampler_state_restores_the_batch_stream(sampling):
    sampler = BatchSampler(np.arange(1000, dtype=np.uint16), 8, 4, seed=3, sampling=sampling)
    for _ in range(40):  # past the first epoch's 124 windows
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch()[0] for _ in range(40)]  # and on into the next
    fresh = BatchSampler(np.arange(1000, dtype=np.uint16), 8, 4, seed=99, sampling=sampling)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.next_batch()[0], batch) for batch in expected)


def test_an_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="sampling must be one of"):
        BatchSampler(np.arange(100, dtype=np.uint16), 8, 4, seed=0, sampling="sequential")
