from __future__ import annotations

import pytest
import torch

from data import BatchSampler, DataError, read_text, split_ids


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"does not exist; pass --data-path"),
        (b"", r"is empty"),
        (b"caf\xe9 au lait", r"is not UTF-8 text \(byte 3"),
    ],
)
def test_unusable_data_files_are_reported(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_text(path)


def test_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_text(tmp_path)


def test_split_keeps_order_and_fraction():
    ids = torch.arange(100)
    splits = split_ids(ids, train_fraction=0.9, block_size=8)
    assert torch.equal(splits.train, torch.arange(90))
    assert torch.equal(splits.val, torch.arange(90, 100))


def test_text_too_short_for_the_block_size_names_the_split():
    with pytest.raises(DataError, match=r"val split has 10 tokens but block_size=16 needs at "
                                        r"least 17"):
        split_ids(torch.arange(100), train_fraction=0.9, block_size=16)


def test_batches_are_shifted_windows_of_the_data():
    data = torch.arange(1000)
    x, y = BatchSampler(data, block_size=8, batch_size=5, seed=0).next_batch()
    assert x.shape == y.shape == (5, 8)
    assert x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 7, dtype=torch.long))  # contiguous
    assert int(y.max()) < 1000 and int(x.min()) >= 0


def test_batches_are_reproducible_under_the_seed():
    data = torch.arange(1000)
    first = [BatchSampler(data, 8, 4, seed=3).next_batch()[0] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    other = BatchSampler(data, 8, 4, seed=4).next_batch()[0]
    assert not torch.equal(first[0], other)


def test_sampler_state_restores_the_batch_stream():
    sampler = BatchSampler(torch.arange(1000), 8, 4, seed=3)
    sampler.next_batch()
    state = sampler.state_dict()
    expected = sampler.next_batch()[0]
    sampler.next_batch()
    sampler.load_state_dict(state)
    assert torch.equal(sampler.next_batch()[0], expected)
