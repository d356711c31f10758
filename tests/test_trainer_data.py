"""trainer/data.py: Petastorm loaders over real prepared tables (synthetic faces, tiny crops)."""
import dataclasses
import queue
import shutil

import numpy as np
import pytest

from schemas import layout
from trainer import bundle, data


def test_split_sources_match_the_manifest(tables):
    root, manifest, v0 = tables
    for split in ("train", "val", "test"):
        assert data.split_source(str(root / "pq"), split).rows == manifest["splits"][split]
        latest = data.split_source(str(root / "delta"), split)
        assert latest.rows == manifest["splits"][split] and latest.version == 1
        pinned = data.split_source(str(root / "delta"), split, version=0)
        assert pinned.rows == v0["splits"][split] and pinned.version == 0


def test_unfinished_parquet_is_refused(tables, tmp_path):
    root, _, _ = tables
    copy = tmp_path / "copy"
    shutil.copytree(root / "pq", copy)
    (copy / "faces" / "_SUCCESS").unlink()
    with pytest.raises(layout.IncompleteTableError, match="did not finish"):
        data.split_source(str(copy), "train")


def test_every_epoch_yields_the_whole_split(tables):
    root, manifest, _ = tables
    settings = data.LoaderSettings(batch_size=8, image_size=32, workers=2, shuffle_buffer=32)
    loaders = {split: data.SplitLoader(data.split_source(str(root / "pq"), split), settings, train=split == "train")
               for split in ("train", "val", "test")}
    for epoch in range(3):
        ages, shapes = [], set()
        for batch in loaders["train"]:
            ages += batch["age"].tolist()
            shapes.add(tuple(batch["image"].shape[1:]))
        assert len(ages) == manifest["splits"]["train"], f"epoch {epoch}"
        assert shapes == {(3, 32, 32)}
    val = [b["age"].tolist() for b in loaders["val"]]
    assert sum(len(a) for a in val) == manifest["splits"]["val"]


def test_loaders_only_decode_and_training_only_reorders(tables):
    """The loaders hand over the decoded crops as they are (augmentation is the training loop's, on whole
    batches: trainer/augment.py); a training loader only shuffles, so its epoch holds the same images."""
    root, _, _ = tables
    source = data.split_source(str(root / "pq"), "val")
    plain = data.SplitLoader(source, data.LoaderSettings(batch_size=64, image_size=32), train=False)
    shuffled = data.SplitLoader(source, data.LoaderSettings(batch_size=64, image_size=32, shuffle_buffer=16),
                                train=True)

    def by_age(loader):
        out = {}
        for b in loader:
            for age, im in zip(b["age"].tolist(), bundle.normalize(b["image"]).numpy()):
                out.setdefault(age, []).append(float(np.abs(im).sum()))
        return {k: sorted(v) for k, v in out.items()}

    assert by_age(plain) == by_age(plain) == by_age(shuffled)


def test_short_epoch_is_an_error(tables):
    root, _, _ = tables
    source = data.split_source(str(root / "pq"), "train")
    first = source.group_rows[0]
    lying = dataclasses.replace(source, group_rows=((first[0] + 1,) + first[1:],) + source.group_rows[1:])
    with pytest.raises(data.ShortEpochError, match="refusing"):
        for _ in data.SplitLoader(lying, data.LoaderSettings(batch_size=16, image_size=32), train=False):
            pass


class _LateVentilator:
    """Hands out its last item at the moment completed() is asked, as the ventilator thread can."""

    def __init__(self, pool):
        self.pool = pool

    def completed(self):
        if self.pool._ventilated_items_by_worker[0] == 0:
            self.pool._ventilated_items_by_worker[0] = 1
            self.pool._results_queues[0].put("the last row group")
        return True

    def processed_item(self):
        pass


def _pool():
    from petastorm.workers_pool.thread_pool import ThreadPool

    pool = ThreadPool.__new__(ThreadPool)
    pool.workers_count = 1
    pool._ventilated_items_by_worker = [0]
    pool._ventilated_items_processed_by_worker = [0]
    pool._results_queues = [queue.Queue()]
    pool._get_results_worker_id = 0
    pool._shuffle_rows, pool._seed = False, None
    pool._ventilator = _LateVentilator(pool)
    return pool


def test_petastorm_race_loses_data_upstream_and_not_with_the_fix():
    from petastorm.workers_pool import EmptyResultError

    from petastorm.workers_pool.thread_pool import ThreadPool

    upstream = data._UPSTREAM_GET_RESULTS or ThreadPool.get_results
    assert upstream is not data._get_results_fixed
    with pytest.raises(EmptyResultError):
        upstream(_pool())  # the bug: an item exists, yet the epoch ends
    assert data._get_results_fixed(_pool()) == "the last row group"


def test_shuffle_buffer_mixes_row_groups_and_keeps_every_row():
    import torch

    groups = [(torch.full((50, 3, 2, 2), g, dtype=torch.uint8), torch.arange(g * 50, g * 50 + 50).float())
              for g in range(6)]
    out = list(data.batches(iter(groups), 16, 100, torch.Generator().manual_seed(0)))
    ages = torch.cat([b["age"] for b in out])
    assert sorted(ages.tolist()) == list(range(300))  # every row exactly once
    assert len(set(out[0]["image"][:, 0, 0, 0].tolist())) > 1  # one batch draws from several row groups
    assert all((b["image"][:, 0, 0, 0].float() == (b["age"] // 50)).all() for b in out)  # rows stay whole
    plain = list(data.batches(iter(groups), 16, 0))
    assert torch.cat([b["age"] for b in plain]).tolist() == list(range(300))  # no buffer: order kept


def test_pyarrow_reader_yields_what_petastorm_yields(tables):
    root, manifest, _ = tables
    source = data.split_source(str(root / "pq"), "val")

    def rows(reader, train):
        settings = data.LoaderSettings(batch_size=8, image_size=32, reader=reader)
        out = []
        for b in data.SplitLoader(source, settings, train=train):
            out += [(age, int(im.sum())) for age, im in zip(b["age"].tolist(), b["image"])]
        return sorted(out)

    assert len(rows("pyarrow", False)) == manifest["splits"]["val"]
    assert rows("pyarrow", False) == rows("petastorm", False)  # same pixels, same ages, nothing lost
    assert rows("pyarrow", True) == rows("pyarrow", False)  # shuffling (strength 0) changes order only


def _many_row_groups(root, tmp_path, rows_per_group=4):
    """A copy of the fixture's train split as one Parquet file of several small row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = data.split_source(str(root / "pq"), "train")
    table = pa.concat_tables(pq.read_table(layout.local_path(f)) for f in source.files)
    folder = tmp_path / "sharded" / "faces"
    (folder / "split=train").mkdir(parents=True)
    pq.write_table(table, folder / "split=train" / "part-0.parquet", row_group_size=rows_per_group)
    (folder / "_SUCCESS").write_text("")
    return data.split_source(str(tmp_path / "sharded"), "train")


@pytest.mark.parametrize("reader", data.READERS)
def test_shards_split_the_rows_exactly(tables, tmp_path, reader):
    root, manifest, _ = tables
    source = _many_row_groups(root, tmp_path)
    assert source.rows == manifest["splits"]["train"] and len(source.row_groups()) >= 4

    def rows(shard, epoch):
        settings = data.LoaderSettings(batch_size=8, image_size=32, reader=reader,
                                       cur_shard=shard, shard_count=2, seed=3)
        loader = data.SplitLoader(source, settings, train=True)
        loader.epoch = epoch
        return [(age, int(im.sum())) for b in loader for age, im in zip(b["age"].tolist(), b["image"])]

    whole = sorted((age, int(im.sum())) for b in data.SplitLoader(
        source, data.LoaderSettings(batch_size=8, image_size=32, reader=reader), train=False)
        for age, im in zip(b["age"].tolist(), b["image"]))
    for epoch in (0, 1):
        a, b = rows(0, epoch), rows(1, epoch)
        assert a and b  # both ranks get data
        assert sorted(a + b) == whole  # together exactly the split: nothing lost, nothing twice
    assert rows(0, 0) != rows(0, 1)  # ranks draw new row groups each epoch, as a sampler's set_epoch does


def test_more_shards_than_row_groups_is_refused(tables):
    root, _, _ = tables
    source = data.split_source(str(root / "pq"), "val")
    settings = data.LoaderSettings(cur_shard=0, shard_count=len(source.row_groups()) + 1)
    with pytest.raises(ValueError, match="fewer than"):
        list(data.SplitLoader(source, settings, train=True))


@pytest.mark.parametrize("reader", data.READERS)
def test_the_cache_yields_the_same_rows_as_reading(tables, reader):
    """--cache: the first pass keeps the decoded crops; later epochs come from memory with the same rows (val:
    the same images; train: the same ages, freshly shuffled), each epoch's count still checked."""
    root, _, _ = tables
    base = data.LoaderSettings(batch_size=8, image_size=32, workers=2, shuffle_buffer=16, reader=reader)
    cached_settings = data.LoaderSettings(**{**base.__dict__, "cache": True})
    for split, train in (("val", False), ("train", True)):
        source = data.split_source(str(root / "pq"), split)
        plain, cached = data.SplitLoader(source, base, train), data.SplitLoader(source, cached_settings, train)
        for epoch in range(3):
            a = list(plain)
            b = list(cached)
            assert cached._cache is not None  # filled by the first complete pass
            ages_a = sorted(x for batch in a for x in batch["age"].tolist())
            ages_b = sorted(x for batch in b for x in batch["age"].tolist())
            assert ages_a == ages_b and len(ages_b) == source.rows
            if not train:  # no augmentation: the very same images (order aside)
                key = lambda batches: sorted(im.numpy().tobytes() for batch in batches for im in batch["image"])  # noqa: E731
                assert key(a) == key(b)
    with pytest.raises(ValueError, match="leave out --cache for distributed training"):
        data.SplitLoader(source, data.LoaderSettings(cache=True, cur_shard=0, shard_count=2), True)


def test_cached_epochs_read_nothing_from_disk(tables, tmp_path):
    import shutil

    root, _, _ = tables
    copy = tmp_path / "pq"
    shutil.copytree(root / "pq", copy)
    source = data.split_source(str(copy), "train")
    loader = data.SplitLoader(source, data.LoaderSettings(batch_size=8, image_size=32, workers=2, cache=True,
                                                          reader="pyarrow"), train=True)
    first = sorted(x for batch in loader for x in batch["age"].tolist())
    shutil.rmtree(copy / "faces")  # the table is gone: a cached epoch must not need it
    second = sorted(x for batch in loader for x in batch["age"].tolist())
    assert first == second and len(second) == source.rows
