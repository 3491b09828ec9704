"""The shard loader: lecture order, rank striding, shared shard switches, token accounting, state round-trip."""
import numpy as np
import pytest
import torch

from helpers import write_shards
from train_gpt2 import DataLoader, UserError, load_splits

B, T = 2, 4


def shards_of(lengths):
    """Shards whose tokens are globally distinct: token = 1000 * shard + position."""
    return [np.arange(1000 * i, 1000 * i + n, dtype=np.uint16) for i, n in enumerate(lengths)]


def rows(loader, n):
    """n micro-batches as a list of x rows (tuples), checking y is x shifted by one."""
    out = []
    for _ in range(n):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (loader.B, loader.T)
        assert torch.equal(x[:, 1:], y[:, :-1])
        out.append([tuple(r) for r in x.tolist()])
    return out


def test_single_rank_is_the_lecture_order():
    tokens = np.arange(0, 200, dtype=np.uint16)
    loader = DataLoader([tokens], B, T)
    for k in range(5):
        x, y = loader.next_batch()
        buf = torch.from_numpy(tokens[k * B * T:k * B * T + B * T + 1].astype(np.int64))
        assert torch.equal(x, buf[:-1].view(B, T)) and torch.equal(y, buf[1:].view(B, T))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_what_one_rank_would_read(world):
    shards = shards_of([37, 50, 29, 61])
    single = DataLoader(shards, B * world, T)
    ranks = [DataLoader(shards, B, T, rank=r, world_size=world) for r in range(world)]
    for _ in range(12):  # crosses shard boundaries and the epoch end
        x_all, _ = single.next_batch()
        x_ranks = torch.cat([r.next_batch()[0] for r in ranks])
        assert torch.equal(x_all, x_ranks)
        # every rank is on the same shard at the same step
        assert len({(r.epoch, r.shard_pos, r.cursor) for r in ranks}) == 1


def test_token_accounting_over_an_epoch():
    lengths = [37, 50, 29, 61, 3]  # the last shard is shorter than one window
    shards = shards_of(lengths)
    world = 2
    ranks = [DataLoader(shards, B, T, rank=r, world_size=world) for r in range(world)]
    windows = sum((n - 1) // T for n in lengths)
    seen = []
    steps = 0
    while ranks[0].epoch == 0:
        for r in ranks:
            seen += [row for batch in rows(r, 1) for row in batch]
        steps += 1
    # every window of every shard served once (the epoch's last micro-step wraps into the next epoch)
    expected = {tuple(range(1000 * i + w * T, 1000 * i + w * T + T)) for i, n in enumerate(lengths) for w in range((n - 1) // T)}
    assert set(seen) >= expected
    assert len(seen) - len(expected) < B * world
    assert steps == -(-windows // (B * world))


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_round_trip(shuffle):
    shards = shards_of([37, 50, 29, 61])
    a = DataLoader(shards, B, T, rank=1, world_size=2, shuffle=shuffle, seed=7)
    rows(a, 9)
    state = a.state_dict()
    assert state == {"epoch": state["epoch"], "shard_pos": state["shard_pos"], "cursor": state["cursor"],
                     "shard_tokens": [37, 50, 29, 61], "shuffle": shuffle, "seed": 7}
    assert all(isinstance(state[k], int) for k in ("epoch", "shard_pos", "cursor"))
    b = DataLoader(shards, B, T, rank=1, world_size=2, shuffle=shuffle, seed=7)
    b.set_state(state)
    assert rows(a, 20) == rows(b, 20)
    # a position in other data, or in another order, is refused (the seed only orders shuffled data)
    others = [DataLoader(shards_of([37, 50, 29]), B, T, shuffle=shuffle, seed=7),
              DataLoader(shards, B, T, shuffle=not shuffle, seed=7)]
    if shuffle:
        others.append(DataLoader(shards, B, T, shuffle=True, seed=8))
    for other in others:
        with pytest.raises(UserError, match="resume with the same data|resume it the same way"):
            other.set_state(state)
    DataLoader(shards, B, T, shuffle=shuffle, seed=7 if shuffle else 8).set_state(state)
    # the state is world-size free: a 1-rank loader at that state reads what both ranks would
    c = DataLoader(shards, 2 * B, T, shuffle=shuffle, seed=7)
    c.set_state(state)
    d = [DataLoader(shards, B, T, rank=r, world_size=2, shuffle=shuffle, seed=7) for r in range(2)]
    for r in d:
        r.set_state(state)
    assert [sum(batch, []) for batch in zip(*[rows(r, 5) for r in d])] == rows(c, 5)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_position_past_a_shard_is_refused_even_beside_shards_without_windows(shuffle):
    """Shards of 0 and 3 tokens have no window of T+1: a cursor into one is not moved on to the next shard."""
    shards = shards_of([0, 21, 3, 41])  # windows 0, 5, 0, 10
    loader = DataLoader(shards, B, T, shuffle=shuffle, seed=3)
    order = [int(i) for i in loader.order]
    for shard, cursor in [(0, 999), (2, 7), (1, 6), (3, 11)]:
        with pytest.raises(UserError, match="is not in this data"):
            loader.set_state(dict(loader.state_dict(), epoch=0, shard_pos=order.index(shard), cursor=cursor))
    loader.set_state(dict(loader.state_dict(), epoch=0, shard_pos=order.index(3), cursor=10))  # its end: fine
    for state in [None, [0, 0, 0], {"epoch": 0, "cursor": 0}]:
        with pytest.raises(UserError, match="not a loader state"):
            loader.set_state(state)
    if shuffle:
        with pytest.raises(UserError, match="resume it the same way"):
            loader.set_state({"epoch": 0, "shard_pos": 0, "cursor": 0, "shuffle": True})  # no seed


def test_shuffle_permutes_windows_and_shards_per_epoch():
    shards = shards_of([41, 81, 61])
    windows = sum((n - 1) // T for n in [41, 81, 61])
    plain = sum(rows(DataLoader(shards, 1, T), windows), [])
    shuffled = DataLoader(shards, 1, T, shuffle=True, seed=3)
    epoch0 = sum(rows(shuffled, windows), [])
    epoch1 = sum(rows(shuffled, windows), [])
    assert sorted(epoch0) == sorted(plain) == sorted(epoch1)
    assert epoch0 != plain and epoch0 != epoch1
    again = sum(rows(DataLoader(shards, 1, T, shuffle=True, seed=3), windows), [])
    assert again == epoch0  # seeded
    other = sum(rows(DataLoader(shards, 1, T, shuffle=True, seed=4), windows), [])
    assert other != epoch0


def test_reset_restarts_from_the_beginning():
    loader = DataLoader(shards_of([50, 50]), B, T)
    first = rows(loader, 3)
    loader.reset()
    assert rows(loader, 3) == first


def test_too_little_data():
    with pytest.raises(UserError, match="too few for one micro-batch"):
        DataLoader(shards_of([8]), B, T, world_size=2)


def test_load_splits_from_a_folder(tmp_path):
    folder = write_shards(str(tmp_path / "d"), {"val": [100], "train": [300, 200]})
    splits = load_splits(folder, need_val=True)
    assert [len(s) for s in splits["train"]] == [300, 200] and [len(s) for s in splits["val"]] == [100]
    assert splits["train"][0][0] == 100  # val shard first, train after it, in name order


def test_the_last_split_in_a_name_decides(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    np.save(folder / "my_val_set_train_000001.npy", np.arange(100, dtype=np.uint16))
    np.save(folder / "my_train_set_val_000000.npy", np.arange(50, dtype=np.uint16))
    splits = load_splits(str(folder), need_val=True)
    assert [len(s) for s in splits["train"]] == [100] and [len(s) for s in splits["val"]] == [50]


def test_load_splits_rejects_bad_folders(tmp_path):
    with pytest.raises(UserError, match="python fineweb.py"):
        load_splits(str(tmp_path / "missing"), need_val=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*_train_\\*.npy shards"):
        load_splits(str(tmp_path / "empty"), need_val=True)
    folder = write_shards(str(tmp_path / "wide"), {"val": [10], "train": [10]}, dtype=np.int32)
    with pytest.raises(UserError, match="uint16"):
        load_splits(folder, need_val=True)
    only_train = write_shards(str(tmp_path / "t"), {"train": [10]})
    assert load_splits(only_train, need_val=False)["val"] == []
    with pytest.raises(UserError, match="no \\*_val_\\*.npy shards"):
        load_splits(only_train, need_val=True)


def test_text_file_split(tmp_path):
    import tiktoken
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    path = tmp_path / "input.txt"
    path.write_text(text)
    splits = load_splits(str(path), need_val=True)
    tokens = tiktoken.get_encoding("gpt2").encode_ordinary(text)
    n = int(0.9 * len(tokens))
    assert splits["train"][0].tolist() == tokens[:n] and splits["val"][0].tolist() == tokens[n:]
