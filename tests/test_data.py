"""fastrec.data: loaders (MovieLens, RecBole .inter, CSV logs), filters, the leave-one-out split,
padding and batches, on small hand-written files whose answers are worked out by hand, plus the
real MovieLens-100K from the recbole wheel (installed by dev.sh)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from fastrec.data import (
    Batches,
    DataError,
    kcore,
    leave_one_out,
    load,
    load_csv,
    load_movielens,
    load_recbole_inter,
    pad,
    synthetic,
    train_examples,
)
from fastrec.data import loaders as loaders_module

HAS_RECBOLE = importlib.util.find_spec("recbole") is not None


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_movielens_u_data_remaps_ids_with_zero_as_padding(tmp_path):
    path = write(tmp_path, "u.data", "7\t30\t4\t100\n5\t10\t3\t90\n7\t10\t5\t80\n")
    inter = load_movielens(path)
    assert (inter.n_users, inter.n_items) == (2, 2)
    assert inter.user_ids.tolist() == [5, 7] and inter.item_ids.tolist() == [-1, 10, 30]
    assert inter.user.tolist() == [1, 0, 1] and inter.item.tolist() == [2, 1, 1]
    assert inter.time.dtype == np.int64 and inter.time.tolist() == [100, 90, 80]


def test_movielens_ratings_dat_and_min_rating(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::20::5::3\n1::21::2::4\n2::20::4::5\n")
    inter = load(path, min_rating=4)
    assert len(inter) == 2 and inter.item_ids.tolist() == [-1, 20]
    assert inter.user_ids.tolist() == [1, 2]


def test_recbole_inter_typed_header_in_any_column_order(tmp_path):
    text = "timestamp:float\titem_id:token\tuser_id:token\n3.0\t11\t2\n1.0\t12\t2\n"
    inter = load(write(tmp_path, "x.inter", text))
    assert inter.user.tolist() == [0, 0] and inter.item.tolist() == [1, 2] and inter.time.tolist() == [3, 1]


def test_recbole_inter_missing_column_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "bad.inter", "user_id:token\trating:float\n1\t3\n")
    with pytest.raises(DataError, match=r"bad\.inter: line 1: missing column 'item_id'"):
        load_recbole_inter(path)


def test_non_numeric_id_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "u.data", "1\t10\t4\t100\n2\tabc\t4\t101\n")
    with pytest.raises(DataError, match=r"u\.data: line 2: column 'item': expected an integer id, got 'abc'"):
        load_movielens(path)


def test_short_row_names_line(tmp_path):
    path = write(tmp_path, "log.csv", "user,item,ts\n1,2,3\n4,5\n")
    with pytest.raises(DataError, match=r"log\.csv: line 3: 2 fields, no column 2 \(time\)"):
        load_csv(path, user="user", item="item", time="ts")


def test_csv_missing_named_column(tmp_path):
    path = write(tmp_path, "events.csv", "timestamp,visitorid,event\n1,2,view\n")
    with pytest.raises(DataError, match=r"events\.csv: line 1: missing column 'itemid' for item"):
        load_csv(path, user="visitorid", item="itemid", time="timestamp")


def test_empty_after_filtering_is_an_error(tmp_path):
    path = write(tmp_path, "u.data", "1\t10\t2\t100\n2\t11\t3\t101\n")
    with pytest.raises(DataError, match=r"u\.data: no interactions left after filtering \(min_rating=5"):
        load_movielens(path, min_rating=5)


def test_csv_event_filter_retailrocket_style(tmp_path):
    text = "timestamp,visitorid,event,itemid,transactionid\n5,1,view,100,\n6,1,transaction,101,9\n7,2,view,100,\n"
    path = write(tmp_path, "events.csv", text)
    inter = load_csv(path, user="visitorid", item="itemid", time="timestamp", event="event", events=["transaction"])
    assert len(inter) == 1 and inter.item_ids.tolist() == [-1, 101] and inter.user_ids.tolist() == [1]
    with pytest.raises(DataError, match=r"no rows with event in \['buy'\]"):
        load_csv(path, user="visitorid", item="itemid", time="timestamp", event="event", events="buy")


def test_csv_without_header_by_index_taobao_style(tmp_path):
    path = write(tmp_path, "UserBehavior.csv", "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,buy,1511561733\n")
    inter = load_csv(path, user=0, item=1, time=4, event=3, events=["buy"])
    assert inter.item_ids.tolist() == [-1, 2333346] and inter.time.tolist() == [1511561733]


def test_csv_iso_times_rees46_style(tmp_path):
    text = (
        "event_time,event_type,product_id,user_id\n"
        "2019-10-01 00:00:10 UTC,view,44,7\n"
        "2019-10-01 00:01:00 UTC,cart,45,7\n"
    )
    inter = load_csv(write(tmp_path, "2019-Oct.csv", text), user="user_id", item="product_id", time="event_time")
    assert inter.time.tolist() == [1569888010, 1569888060]
    bad = write(tmp_path, "bad.csv", "event_time,product_id,user_id\nyesterday,44,7\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 2: column 'time': expected a number or an ISO date"):
        load_csv(bad, user="user_id", item="product_id", time="event_time")


def test_kcore_repeats_until_stable():
    # user 2 has one item; dropping it leaves item 12 with one user, which then goes too.
    user = np.array([0, 0, 1, 1, 2, 1, 0])
    item = np.array([10, 11, 10, 11, 12, 12, 13])
    keep = kcore(user, item, 2)
    assert keep.tolist() == [True, True, True, True, False, False, False]


def test_leave_one_out_orders_by_time_then_file_row():
    inter = synthetic(3, 20, 5, seed=1)
    # One hand-made user: times 5, 3, 3, 7 in file order -> (3, row 1), (3, row 2), 5, 7.
    inter.user = np.array([0, 0, 0, 0, 1, 1])
    inter.item = np.array([1, 2, 3, 4, 5, 6])
    inter.time = np.array([5, 3, 3, 7, 1, 2])
    inter.n_users = 2
    split = leave_one_out(inter)
    assert [s.tolist() for s in split.train] == [[2, 3], [5, 6]]
    assert split.users.tolist() == [0, 1] and split.eval_users.tolist() == [0]
    assert [h.tolist() for h in split.valid_history] == [[2, 3]] and split.valid_target.tolist() == [1]
    assert [h.tolist() for h in split.test_history] == [[2, 3, 1]] and split.test_target.tolist() == [4]


def test_train_examples_every_prefix_cut_to_max_len():
    inter = synthetic(1, 20, 5, seed=1)
    inter.user, inter.item, inter.time = np.zeros(7, np.int64), np.arange(1, 8), np.arange(7)
    split = leave_one_out(inter)
    assert split.train[0].tolist() == [1, 2, 3, 4, 5]
    histories, targets, users = train_examples(split, max_len=2, return_users=True)
    assert [h.tolist() for h in histories] == [[1], [1, 2], [2, 3], [3, 4]]
    assert targets.tolist() == [2, 3, 4, 5] and users.tolist() == [0, 0, 0, 0]
    histories, targets = train_examples(split, max_len=3, augment=False)
    assert [h.tolist() for h in histories] == [[2, 3, 4]] and targets.tolist() == [5]


def test_pad_keeps_last_items_on_either_side():
    histories = [np.array([1, 2, 3, 4]), np.array([5]), np.array([], dtype=np.int64)]
    items, lengths = pad(histories, 3, side="left")
    assert items.tolist() == [[2, 3, 4], [0, 0, 5], [0, 0, 0]] and lengths.tolist() == [3, 1, 0]
    items, lengths = pad(histories, 3, side="right")
    assert items.tolist() == [[2, 3, 4], [5, 0, 0], [0, 0, 0]] and items.dtype == torch.long
    with pytest.raises(ValueError, match="side must be 'left' or 'right', got 'up'"):
        pad(histories, 3, side="up")


def test_batches_cover_each_example_once_per_epoch_reproducibly():
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 50, size=int(rng.integers(1, 8))) for _ in range(23)]
    targets = np.arange(100, 123)
    users = np.arange(23) % 5
    batches = Batches(histories, targets, users, max_len=4, batch_size=5, side="right", shuffle=True, seed=3)
    assert len(batches) == 5
    epoch1 = list(batches)
    epoch2 = list(batches)
    assert [len(b) for b in epoch1] == [5, 5, 5, 5, 3]
    seen1 = torch.cat([b.target for b in epoch1])
    assert sorted(seen1.tolist()) == targets.tolist()
    assert seen1.tolist() != torch.cat([b.target for b in epoch2]).tolist()  # a new order each epoch
    again = Batches(histories, targets, users, max_len=4, batch_size=5, side="right", shuffle=True, seed=3)
    assert torch.equal(next(iter(again)).items, epoch1[0].items)
    for b in epoch1:
        for row in range(len(b)):
            j = int(b.target[row]) - 100
            n = min(4, len(histories[j]))
            assert b.lengths[row] == n and b.user[row] == users[j]
            assert b.items[row, :n].tolist() == histories[j][-n:].tolist() and not b.items[row, n:].any()


def test_synthetic_is_skewed_reproducible_and_long_enough():
    a, b = synthetic(300, 50, 12, seed=4), synthetic(300, 50, 12, seed=4)
    assert np.array_equal(a.item, b.item) and np.array_equal(a.time, b.time)
    counts = np.bincount(a.user)
    assert counts.min() >= 3 and abs(counts.mean() - 12) < 1.5
    popularity = np.bincount(a.item, minlength=a.n_items + 1)[1:]
    assert popularity.max() > 5 * np.median(popularity)
    assert a.item.min() == 1 and a.item.max() == a.n_items


@pytest.mark.skipif(not HAS_RECBOLE, reason="recbole wheel not installed (./dev.sh installs it)")
def test_ml100k_from_the_recbole_wheel():
    inter = load("ml-100k")
    assert (len(inter), inter.n_users, inter.n_items) == (100_000, 943, 1682)
    split = leave_one_out(inter)
    assert len(split.eval_users) == 943 and sum(len(s) for s in split.train) == 100_000 - 2 * 943
    histories, targets = train_examples(split, 50)
    assert len(histories) == 100_000 - 3 * 943 and targets.min() >= 1


def test_missing_data_set_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(loaders_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps recbole==1\.2\.1"):
        load("ml-100k")


def test_unknown_name_and_missing_mapping(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data set named 'ml-1m'"):
        load("ml-1m")
    path = write(tmp_path, "log.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="needs the column mapping user=, item=, time="):
        load(path)


def test_non_finite_time_and_rating_name_the_line(tmp_path):
    path = write(tmp_path, "log.csv", "u,i,t\n1,2,5\n1,3,nan\n")
    with pytest.raises(DataError, match=r"log\.csv: line 3: column 'time': expected a finite time, got 'nan'"):
        load_csv(path, user="u", item="i", time="t")
    path = write(tmp_path, "u.data", "1\t10\tinf\t100\n")
    with pytest.raises(DataError, match=r"u\.data: line 1: column 'rating': expected a finite number, got 'inf'"):
        load_movielens(path)


def test_min_rating_needs_a_rating_column_and_kcore_passes_through_load(tmp_path):
    path = write(tmp_path, "log.csv", "u,i,t\n1,2,5\n1,3,6\n2,2,7\n2,3,8\n3,2,9\n")
    with pytest.raises(ValueError, match="min_rating=4 given but .*log.csv has no rating column"):
        load_csv(path, user="u", item="i", time="t", min_rating=4)
    inter = load(path, user="u", item="i", time="t", kcore=2)
    assert inter.user_ids.tolist() == [1, 2] and len(inter) == 4


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_bytes(b"\xef\xbb\xbfu,i,t\n1,2,5\n1,3,6\n")
    assert load_csv(str(csv), user="u", item="i", time="t").item_ids.tolist() == [-1, 2, 3]
    inter = tmp_path / "x.inter"
    inter.write_bytes(b"\xef\xbb\xbfuser_id:token\titem_id:token\ttimestamp:float\n2\t11\t3\n2\t12\t1\n")
    assert load(str(inter)).item_ids.tolist() == [-1, 11, 12]
    ratings = tmp_path / "ratings.csv"
    ratings.write_bytes(b"\xef\xbb\xbfuserId,movieId,rating,timestamp\n1,20,5,3\n")
    assert load(str(ratings)).item_ids.tolist() == [-1, 20]


def test_non_utf8_byte_names_file_and_line(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_bytes(b"u,i,t\n1,2,5\n1,3,\xff6\n")
    with pytest.raises(DataError, match=r"log\.csv: line 3: byte 0xff at column 5 is not UTF-8"):
        load_csv(str(csv), user="u", item="i", time="t")
    inter = tmp_path / "x.inter"
    inter.write_bytes(b"user_id:token\titem_id:token\n\xe9\t11\n")
    with pytest.raises(DataError, match=r"x\.inter: line 2: byte 0xe9 at column 1 is not UTF-8"):
        load(str(inter))


@pytest.mark.parametrize("value", ["12345678901234567890", "-9223372036854775809"])
def test_id_out_of_int64_range_names_file_line_and_column(tmp_path, value):
    path = write(tmp_path, "log.csv", f"u,i,t\n1,2,5\n{value},3,6\n")
    with pytest.raises(DataError, match=rf"log\.csv: line 3: column 'user': id {value} does not fit in 64 bits"):
        load_csv(path, user="u", item="i", time="t")
    assert load_csv(write(tmp_path, "ok.csv", "u,i,t\n9223372036854775807,2,5\n"), user="u", item="i", time="t")


def test_train_sequences_windows_every_target_once_and_position_batches_align():
    from fastrec.data import PositionBatches
    from fastrec.data.split import Split, train_sequences

    seqs = [np.arange(1, 8), np.array([9]), np.array([4, 5])]
    split = Split(seqs, np.array([3, 4, 5]), [], np.empty(0), [], np.empty(0), np.empty(0), 10, 6)
    inputs, targets, users = train_sequences(split, max_len=3)
    assert [x.tolist() for x in inputs] == [[1, 2, 3], [4, 5, 6], [4]]
    assert [x.tolist() for x in targets] == [[2, 3, 4], [5, 6, 7], [5]]
    assert users.tolist() == [3, 3, 5]
    assert [len(t) for t in targets] == [len(x) for x in inputs]
    assert sorted(np.concatenate(targets).tolist()) == [2, 3, 4, 5, 5, 6, 7]
    for side in ("left", "right"):
        batch = next(iter(PositionBatches(inputs, targets, users, max_len=4, batch_size=3, side=side)))
        assert batch.target.shape == (3, 4)
        assert torch.equal(batch.target > 0, batch.items > 0)
        row = batch.target[2].tolist()
        assert row == ([0, 0, 0, 5] if side == "left" else [5, 0, 0, 0])
    with pytest.raises(ValueError, match="targets\\[0\\] must have history 0's length"):
        PositionBatches(inputs, [t[:1] for t in targets], users, max_len=4)


def test_synthetic_catalogue_shape_ids_skew_sessions_and_seed():
    from fastrec.data import synthetic_catalogue

    a = synthetic_catalogue(n_users=2000, n_items=100_000, mean_len=15, seed=3)
    b = synthetic_catalogue(n_users=2000, n_items=100_000, mean_len=15, seed=3)
    c = synthetic_catalogue(n_users=2000, n_items=100_000, mean_len=15, seed=4)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("user", "item", "time"))
    assert not np.array_equal(a.item, c.item)
    assert (a.n_users, a.n_items, a.item_ids.shape, a.user_ids.shape) == (2000, 100_000, (100_001,), (2000,))
    assert a.item.min() >= 1 and a.item.max() <= 100_000 and a.item.dtype == np.int64
    counts = np.bincount(a.user, minlength=2000)
    assert counts.min() >= 3 and abs(counts.mean() - 15) < 0.5
    assert np.all(np.diff(a.user) >= 0) and np.all(np.diff(a.time)[np.diff(a.user) == 0] > 0)  # chronological
    popularity = np.sort(np.bincount(a.item, minlength=a.n_items + 1)[1:])[::-1]
    assert popularity[0] > 50 * max(1, popularity[1000])  # Zipf: the head dwarfs the 1000th item
    same_user = np.diff(a.user) == 0
    run = same_user & (np.diff(a.item) % a.n_items == 1) & (np.diff(a.time) == 60)
    assert 0.7 < run.sum() / same_user.sum() < 0.9  # sessions continue with probability 0.8
    split = leave_one_out(a)
    assert split.n_items == 100_000
    with pytest.raises(ValueError, match="zipf must be > 0"):
        synthetic_catalogue(10, 100, zipf=0)


def test_train_reads_a_synthetic_catalogue_spec():
    from fastrec.train import TrainConfig, synthetic_options

    assert synthetic_options("synthetic:items=1e6,users=100000,zipf=1.2") == {
        "n_items": 1_000_000,
        "n_users": 100_000,
        "zipf": 1.2,
    }
    for bad, message in (("synthetic:items=2.5", "items must be an int"), ("synthetic:colour=3", "expected synthetic")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(data=bad)
