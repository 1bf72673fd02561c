"""The embed-once store: both payloads (backbone tokens, pooled embeddings) computed once, stored
exactly or within their storage error, resumed, split across processes, and checked when read."""

import json
import os
import stat
import textwrap
import threading
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nearid.io
from nearid.integrity import checksum_file
from nearid.store.embedding_store import EmbeddingStore
from nearid.store.fill import FillOptions, NotEnoughDiskSpace, check_free_space, fill
from nearid.store.format import StoreFormat, finite_rows, quantize_int8
from nearid.store.layout import StoreCorruptError, StoreMismatchError, store_folder
from nearid.store.reader import pixel_batches
from nearid.store.writer import BackgroundWriter, ShardWriter, npy_header
from nearid.tokens import BackboneTokens
from tests.helpers import (
    TINY_TOKEN_SHAPE,
    Counting,
    PatchTokens,
    assert_finished,
    assert_waits,
    launch,
    load_pixels,
    make_items,
    make_tiny_nearid,
    make_tiny_processor,
)

NUM_TOKENS, HIDDEN = TINY_TOKEN_SHAPE


FINGERPRINT = "tiny-fp"


def build(root, encoder, items, dtype="float32", fingerprint=FINGERPRINT, **options):
    options = {"shard_size": 4, "batch_size": 3, "progress": False, **options}
    return fill(root, fingerprint, StoreFormat((NUM_TOKENS, HIDDEN), dtype), items, load_pixels, encoder,
                FillOptions(**options))


def reference_tokens(model, items, keys):
    with torch.no_grad():
        return model.forward_features(torch.stack([load_pixels(items[key]) for key in keys]))


@pytest.fixture
def model():
    return make_tiny_nearid()


def folder(root, fingerprint=FINGERPRINT):
    """The folder of the store of `fingerprint` under `root`, as `fill` lays it out."""
    return store_folder(root, fingerprint)


def shard(root, number, process=0):
    """The shard file of `process` numbered `number` (its name ends in its checksum)."""
    (path,) = folder(root).glob(f"shard-p{process:03d}-{number:06d}*.npy")
    return path


def shuffled_keys(items):
    keys = list(items)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0)).tolist()
    return [keys[i] for i in order] + keys[:2]  # random order, with repeats


# --------------------------------------------------------------------------------------------------
# Backbone tokens


def test_float32_tokens_equal_forward_features(model, tmp_path):
    items = make_items(9)
    store, report = build(tmp_path / "store", Counting(model), items)
    assert report.skipped == {} and report.images_computed == len(items) and report.forward_passes == 4
    assert len(store) == len(items) and all(key in store for key in items) and "unknown" not in store
    keys = shuffled_keys(items)
    tokens = store.get(keys)
    assert tokens.dtype == torch.float32 and tokens.shape == (len(keys), NUM_TOKENS, HIDDEN)
    torch.testing.assert_close(tokens, reference_tokens(model, items, keys), rtol=1e-5, atol=1e-5)
    assert store.folder == tmp_path / "store" / "tiny-fp"  # the store's folder under its root
    assert len(list(store.folder.glob("shard-p000-*.npy"))) == 3  # 10 images in shards of 4


def test_reopened_store_serves_the_same_tokens(model, tmp_path):
    items = make_items(5)
    store, _ = build(tmp_path, Counting(model), items, dtype="float16")
    reopened = EmbeddingStore.open(tmp_path, "tiny-fp")
    assert len(reopened) == len(store) and reopened.format == store.format
    assert torch.equal(reopened.get(list(items)), store.get(list(items)))


def test_float16_within_float16_rounding(model, tmp_path):
    items = make_items(6)
    store, _ = build(tmp_path, Counting(model), items, dtype="float16")
    keys = shuffled_keys(items)
    expected = reference_tokens(model, items, keys)
    tokens = store.get(keys)
    torch.testing.assert_close(tokens, expected, rtol=2**-10, atol=1e-5)
    assert not torch.equal(tokens, expected)  # really stored in half precision


def test_int8_within_quantisation_error(model, tmp_path):
    items = make_items(6)
    store, _ = build(tmp_path, Counting(model), items, dtype="int8")
    keys = list(items)
    expected = reference_tokens(model, items, keys)
    error = store.get(keys) - expected
    scales = expected.abs().amax(dim=-1) / 127
    assert (error.abs().amax(dim=-1) <= scales / 2 + 1e-5).all()
    assert (error.norm(dim=-1) / expected.norm(dim=-1)).max() < 0.01


def test_quantize_int8_round_trip():
    tokens = torch.randn(2, 5, 64) * torch.tensor([0.01, 1.0, 30.0, 1.0, 1.0])[None, :, None]
    tokens[1, 3] = 0  # an all-zero token must not divide by zero
    values, scales = quantize_int8(tokens)
    assert values.dtype == torch.int8 and scales.shape == (2, 5)
    assert values.abs().amax(dim=-1).tolist() == [[127] * 5, [127, 127, 127, 0, 127]]
    restored = values.float() * scales[..., None]
    assert (restored - tokens).abs().le(scales[..., None] / 2 + 1e-7).all()
    assert torch.equal(restored[1, 3], torch.zeros(64))


def test_head_on_stored_tokens_equals_image_features(model, tmp_path):
    items = make_items(5)
    store, _ = build(tmp_path, Counting(model), items)
    keys = list(items)
    with torch.no_grad():
        from_store = F.normalize(model.forward_head(store.get(keys)), dim=-1)
        live = model.get_image_features(torch.stack([load_pixels(items[key]) for key in keys]))
    torch.testing.assert_close(from_store, live, rtol=1e-5, atol=1e-5)


def test_backbone_tokens_encoder_restores_training_mode_and_keys_on_the_backbone(model):
    encoder = BackboneTokens(model, make_tiny_processor(), "float16")
    model.train()
    tokens = encoder.encode(load_pixels(make_items(1)["img-00"])[None])
    assert model.training and tokens.shape == (1, NUM_TOKENS, HIDDEN)
    assert encoder.format == StoreFormat((NUM_TOKENS, HIDDEN), "float16")
    with torch.no_grad():
        model.head.probe.add_(1.0)  # the head does not change the tokens, nor their key
    assert BackboneTokens(model, make_tiny_processor(), "float16").fingerprint == encoder.fingerprint
    assert BackboneTokens(model, make_tiny_processor(), "int8").fingerprint != encoder.fingerprint
    assert BackboneTokens(model, make_tiny_processor(resample=3), "float16").fingerprint != encoder.fingerprint
    with torch.no_grad():
        model.vision_model.post_layernorm.bias.add_(1.0)
    assert BackboneTokens(model, make_tiny_processor(), "float16").fingerprint != encoder.fingerprint


# --------------------------------------------------------------------------------------------------
# Computing each image once, resuming


def test_refill_computes_only_missing_images(model, tmp_path):
    items = make_items(7)
    build(tmp_path, Counting(model), items)
    encoder = Counting(model)
    store, report = build(tmp_path, encoder, items)
    assert encoder.images == 0 and len(store) == len(items) and report.forward_passes == 0
    more = {**items, **{f"new-{i}": {"seed": 500 + i, "where": f"new {i}"} for i in range(3)}}
    store, report = build(tmp_path, encoder, more)
    assert encoder.images == 3 == report.images_computed and len(store) == len(more)
    torch.testing.assert_close(store.get(list(more)), reference_tokens(model, more, list(more)), rtol=1e-5, atol=1e-5)


def test_interrupted_fill_resumes_with_the_rest(model, tmp_path):
    items = make_items(10)  # 11 images, batches of 2, shards of 4
    encoder = Counting(model, fail_after_batches=3)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        build(tmp_path / "store", encoder, items, batch_size=2)
    assert encoder.images == 6
    kept = {path.name: path.stat().st_mtime_ns for path in folder(tmp_path / "store").glob("shard-*.npy")}
    assert len(kept) == 2  # the full shard of 4 and the 2 rows computed before the interruption
    assert not list(folder(tmp_path / "store").glob(".*.tmp"))

    encoder = Counting(make_tiny_nearid())  # as a new process would: same weights, no interruption
    resumed, _ = build(tmp_path / "store", encoder, items, batch_size=2)
    assert encoder.images == len(items) - 6
    assert kept == {p.name: p.stat().st_mtime_ns for p in folder(tmp_path / "store").glob("shard-*.npy")
                    if p.name in kept}
    uninterrupted, _ = build(tmp_path / "reference", Counting(make_tiny_nearid()), items, batch_size=2)
    torch.testing.assert_close(resumed.get(list(items)), uninterrupted.get(list(items)), rtol=1e-6, atol=1e-6)


def test_deleted_shard_is_recomputed_under_a_new_name(model, tmp_path):
    items = make_items(9)  # 10 images in shards of 4, 4, 2
    build(tmp_path, Counting(model), items)
    shard(tmp_path, 2).unlink()
    encoder = Counting(model)
    store, _ = build(tmp_path, encoder, items)
    assert encoder.images == 2 and len(store) == len(items)
    index = json.loads((folder(tmp_path) / "index.json").read_text())
    index = {entry["file"]: entry["keys"] for entry in index["shards"]}
    assert sorted(index[shard(tmp_path, 2).name]) == sorted(list(items)[8:])  # the new file's own keys
    torch.testing.assert_close(store.get(list(items)), reference_tokens(model, items, list(items)), rtol=1e-5,
                               atol=1e-5)


def test_each_fingerprint_has_its_own_folder_under_the_root(model, tmp_path):
    """Callers pass the root; two ways of computing the same images never meet in one folder."""
    items = make_items(3)
    a, _ = build(tmp_path, Counting(model), items, fingerprint="fp-a")
    b, _ = build(tmp_path, Counting(model), items, dtype="float16", fingerprint="fp-b")
    assert (a.folder, b.folder) == (tmp_path / "fp-a", tmp_path / "fp-b")
    assert EmbeddingStore.open(tmp_path, "fp-a").format.dtype == "float32"
    assert EmbeddingStore.open(tmp_path, "fp-b").format.dtype == "float16"
    for name in ("", ".", "..", "a/b"):
        with pytest.raises(ValueError, match="names one folder under the store root"):
            build(tmp_path, Counting(model), items, fingerprint=name)


def test_another_fingerprint_or_format_is_refused(model, tmp_path):
    build(tmp_path, Counting(model), make_items(3), fingerprint="fp-a")
    encoder = Counting(model)
    with pytest.raises(StoreMismatchError, match="holds .*float32.* this run computes .*int8"):
        build(tmp_path, encoder, make_items(2), dtype="int8", fingerprint="fp-a")
    (tmp_path / "fp-a").rename(tmp_path / "fp-b")  # a store folder copied under another fingerprint's name
    with pytest.raises(StoreMismatchError, match="built for fingerprint fp-a, not fp-b"):
        EmbeddingStore.open(tmp_path, "fp-b")
    with pytest.raises(StoreMismatchError, match="Use another folder"):
        build(tmp_path, encoder, make_items(4), fingerprint="fp-b")
    assert encoder.images == 0


@pytest.mark.parametrize("dtype, scale", [("float16", 1e6), ("int8", float("nan"))])
def test_values_that_cannot_be_stored_are_an_error(model, tmp_path, dtype, scale):
    class Scaled(Counting):
        def encode(self, pixels):
            return super().encode(pixels) * scale

    with pytest.raises(FloatingPointError, match=rf"\['img-00'.* not finite when stored as {dtype}"):
        build(tmp_path, Scaled(model), make_items(2), dtype=dtype)


def test_the_next_batch_is_computed_while_a_shard_is_written(model, tmp_path, monkeypatch):
    """The writes run beside the forward: writing batch 0 waits for batch 1's forward, which a fill that
    wrote each batch before computing the next would never reach."""
    from nearid.store.writer import ShardWriter

    second_batch = threading.Event()
    real_add = ShardWriter.add

    def add_after_the_next_forward(self, keys, values):
        assert second_batch.wait(timeout=20), "batch 0 was written before batch 1 was computed"
        real_add(self, keys, values)

    class Signalling(Counting):
        def encode(self, pixels):
            if self.batches == 1:
                second_batch.set()
            return super().encode(pixels)

    monkeypatch.setattr(ShardWriter, "add", add_after_the_next_forward)
    items = make_items(7)
    store, report = build(tmp_path, Signalling(model), items)
    assert report.images_computed == len(items)
    torch.testing.assert_close(store.get(sorted(items)), reference_tokens(model, items, sorted(items)),
                               rtol=1e-5, atol=1e-5)


def test_a_write_error_stops_the_fill_and_keeps_the_rows_before_it(model, tmp_path):
    class NanInThirdBatch(Counting):
        def encode(self, pixels):
            tokens = super().encode(pixels)
            return tokens * float("nan") if self.batches == 3 else tokens

    items = make_items(12)  # batches of 3: img-00..02, 03..05, 06..08 (NaN), 09..11
    with pytest.raises(FloatingPointError, match=r"\['img-06', 'img-07', 'img-08'\] are not finite"):
        build(tmp_path, NanInThirdBatch(model), items, shard_size=3)
    resumed = Counting(model)
    store, _ = build(tmp_path, resumed, items, shard_size=3)
    assert resumed.images == len(items) - 6  # the 6 rows before the bad batch were kept; it and the next were not
    torch.testing.assert_close(store.get(sorted(items)), reference_tokens(model, items, sorted(items)),
                               rtol=1e-5, atol=1e-5)


def test_not_enough_disk_space_stops_before_computing_and_names_the_options(model, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(nearid.io.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    encoder = Counting(model)
    with pytest.raises(NotEnoughDiskSpace, match=r"needs .* for 5 images .* 1.00 kB free.*int8.*fewer sources"):
        build(tmp_path / "store", encoder, make_items(4))
    assert encoder.images == 0 and not list(folder(tmp_path / "store").glob("shard-*"))


def test_check_free_space_on_a_folder_not_created_yet(tmp_path, monkeypatch):
    seen = []
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(nearid.io.shutil, "disk_usage", lambda path: seen.append(path) or usage(0, 0, 500))
    check_free_space(tmp_path / "a" / "b", 500, "x")
    with pytest.raises(NotEnoughDiskSpace) as raised:
        check_free_space(tmp_path / "a" / "b", 501, "x")
    assert isinstance(raised.value, OSError) and "needs 501 bytes" in str(raised.value)
    assert seen == [tmp_path, tmp_path]


def test_an_unreadable_item_stops_the_fill_naming_it(model, tmp_path):
    from nearid.images import ImageLoadError

    with pytest.raises(ImageLoadError, match="pairs row broken column image"):
        build(tmp_path, Counting(model), make_items(4, corrupt=["broken"]))


def test_skip_errors_leaves_the_image_out_and_reports_it(model, tmp_path):
    items = make_items(4, corrupt=["broken"])
    store, report = build(tmp_path, Counting(model), items, skip_errors=True, num_workers=2)
    assert list(report.skipped) == ["broken"] and "pairs row broken column image" in report.skipped["broken"]
    assert "broken" not in store and len(store) == len(items) - 1
    good = [key for key in items if key != "broken"]
    torch.testing.assert_close(store.get(good), reference_tokens(model, items, good), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="'broken' is not in the store"):
        store.get(["img-00", "broken"])
    encoder = Counting(model)
    _, again = build(tmp_path, encoder, items, skip_errors=True)  # retried: the file may have been fixed
    assert encoder.images == 0 and list(again.skipped) == ["broken"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_bytes_per_item_matches_the_size_on_disk(model, tmp_path, dtype):
    items = make_items(9)
    build(tmp_path, Counting(model), items, dtype=dtype)
    estimate = len(items) * StoreFormat((NUM_TOKENS, HIDDEN), dtype).bytes_per_item
    shards = list(folder(tmp_path).glob("shard-*.npy"))
    shard_bytes = sum(path.stat().st_size for path in shards)
    assert estimate <= shard_bytes <= estimate + len(items) * max(map(len, items)) + 512 * len(shards)
    assert sum(path.stat().st_size for path in folder(tmp_path).iterdir()) <= 1.05 * estimate


def test_so400m_sizes():
    assert StoreFormat((729, 1152), "float16").bytes_per_item == 729 * 1152 * 2  # 1.68 MB per image
    assert StoreFormat((729, 1152), "int8").bytes_per_item == 729 * (1152 + 4)
    assert StoreFormat((1152,), "float32").bytes_per_item == 1152 * 4
    with pytest.raises(ValueError, match="must be one of.*'bfloat16'"):
        StoreFormat((1152,), "bfloat16")


def test_opening_a_folder_without_a_store_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no embedding store"):
        EmbeddingStore.open(tmp_path, "tiny-fp")


def test_files_are_written_with_normal_permissions(model, tmp_path):
    old = os.umask(0o022)
    try:
        build(tmp_path, Counting(model), make_items(2))
    finally:
        os.umask(old)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder(tmp_path).iterdir()}
    assert set(modes.values()) == {0o644}, modes


# --------------------------------------------------------------------------------------------------
# The fill's stages, each alone: reader -> (the caller's encoder) -> writer


def test_the_reader_batches_pixels_and_reports_bad_images_with_their_batch():
    items = make_items(3, corrupt=["broken"])
    batches = [["img-00", "broken"], ["img-01", "img-02"], ["broken"]]
    out = list(pixel_batches(batches, items, load_pixels))
    assert [keys for keys, _, _ in out] == [["img-00"], ["img-01", "img-02"], []]
    assert torch.equal(out[1][1], torch.stack([load_pixels(items["img-01"]), load_pixels(items["img-02"])]))
    assert out[2][1] is None and list(out[0][2]) == ["broken"] and "truncated file" in out[0][2]["broken"]


def test_the_writer_puts_each_batch_on_disk_as_it_arrives_under_its_checksum(tmp_path):
    """No shard-sized buffer: a batch's rows are in the open shard's file before the shard is full, and the
    checksum taken while writing is the checksum of the file (a short last shard is rewritten for its rows)."""
    fmt = StoreFormat((2, 3), "float16")
    keys = [f"k{i}" for i in range(8)]
    values = torch.randn(8, 2, 3)
    writer = ShardWriter(tmp_path, fmt, 0, shard_size=4, keys=keys)
    writer.add(keys[:3], values[:3])
    [temp] = tmp_path.glob(".shard-p000-000000.*.tmp")
    item = fmt.record_dtype(2).itemsize
    header = len(npy_header(fmt.record_dtype(2), 4))
    assert temp.stat().st_size == header + 3 * item  # three rows of four, on disk already
    writer.add(keys[3:6], values[3:6])
    writer.flush()  # 6 of the 8 keys came: the second shard ends short, with 2 rows
    assert not list(tmp_path.glob("*.tmp"))
    shards = sorted(tmp_path.glob("shard-*.npy"))
    assert [entry["file"] for entry in writer.written] == [path.name for path in shards]
    assert [entry["keys"] for entry in writer.written] == [keys[:4], keys[4:6]]
    for path, entry in zip(shards, writer.written):
        assert path.name.endswith(f"-{checksum_file(path)}.npy") and entry["bytes"] == path.stat().st_size
    rows = np.concatenate([np.load(path) for path in shards])
    assert [key.decode() for key in rows["key"]] == keys[:6]
    assert np.array_equal(rows["values"], values[:6].half().numpy())


def test_the_writer_queue_holds_batches_by_their_bytes_so_a_slow_write_does_not_stop_the_forward():
    """Small batches queue well beyond four while a write is slow (the queue is bounded by its memory)."""

    class SlowWriter:
        def __init__(self):
            self.release, self.batches = threading.Event(), []

        def add(self, keys, values):
            assert self.release.wait(60)
            self.batches.append(keys)

        def flush(self):
            pass

    slow = SlowWriter()
    writer = BackgroundWriter(slow)
    adding = threading.Thread(target=lambda: [writer.add([f"k{i}"], torch.zeros(1, 8)) for i in range(12)])
    try:
        adding.start()
        adding.join(timeout=20)
        assert not adding.is_alive(), "the forward waited for a slow write with 12 small batches in flight"
    finally:
        slow.release.set()
        adding.join()
        writer.close()
    assert slow.batches == [[f"k{i}"] for i in range(12)]


def test_a_fill_checksums_its_shards_as_it_writes_them_and_verifies_the_older_ones(model, tmp_path, monkeypatch):
    """The shards a fill writes are not read back to be checksummed (that work would follow the last forward);
    every later fill verifies every shard."""
    import nearid.store.layout

    verified = []
    real_verify = nearid.store.layout.verify_shard
    monkeypatch.setattr(nearid.store.layout, "verify_shard", lambda path: verified.append(path.name) or
                        real_verify(path))
    items = make_items(9)
    build(tmp_path, Counting(model), items)
    assert verified == []
    build(tmp_path, Counting(model), items)
    assert sorted(verified) == sorted(path.name for path in folder(tmp_path).glob("shard-*.npy")) and len(verified) == 3


def test_finite_rows_finds_the_bad_rows_also_when_the_sum_overflows():
    huge = torch.full((3, 4), 3e38)  # every value finite, their sum not
    assert finite_rows(huge).tolist() == [True, True, True]
    huge[1, 2] = float("nan")
    assert finite_rows(huge).tolist() == [True, False, True]
    assert finite_rows(torch.tensor([[1.0, float("inf")], [0.0, 1.0]], dtype=torch.float16)).tolist() == [False, True]


# --------------------------------------------------------------------------------------------------
# What is read is checked


def _poison(shard, value=np.nan):
    records = np.load(shard)
    records["values"][0].flat[0] = value
    np.save(shard, records)


def test_a_shard_with_nan_values_is_named_when_read(model, tmp_path):
    items = make_items(9)
    build(tmp_path, Counting(model), items)
    _poison(shard(tmp_path, 1))
    store = EmbeddingStore.open(tmp_path, "tiny-fp", verify=False)  # large shards are checked as they are read
    with pytest.raises(StoreCorruptError, match=r"shard-p000-000001-\w+\.npy holds non-finite values.*Delete it"):
        store.get(list(items))


def test_a_damaged_shard_is_dropped_and_recomputed_by_the_next_fill(model, tmp_path, caplog):
    items = make_items(9)
    build(tmp_path, Counting(model), items)
    poisoned, truncated = shard(tmp_path, 0), shard(tmp_path, 1)
    _poison(poisoned)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(StoreCorruptError, match=r"shard-p000-000000-\w+\.npy does not match the checksum"):
        EmbeddingStore.open(tmp_path, "tiny-fp")
    with pytest.raises(StoreCorruptError, match=r"shard-p000-000001-\w+\.npy cannot be read.*damaged"):
        EmbeddingStore.open(tmp_path, "tiny-fp", verify=False)
    encoder = Counting(model)
    with caplog.at_level("WARNING", logger="nearid.store"):
        store, _ = build(tmp_path, encoder, items)
    assert encoder.images == 8  # the images of both damaged shards, and only those
    assert f"{poisoned.name} does not match the checksum" in caplog.text
    assert f"{truncated.name} does not match the checksum" in caplog.text
    torch.testing.assert_close(store.get(list(items)), reference_tokens(model, items, list(items)), rtol=1e-5,
                               atol=1e-5)


def test_a_finite_wrong_value_is_found_by_the_checksum_dropped_and_recomputed(model, tmp_path, caplog):
    items = make_items(9)
    build(tmp_path, Counting(model), items, dtype="float16")
    rotten = shard(tmp_path, 1)
    _poison(rotten, 3.0e4)  # finite, in float16 range: a bit flip or a bad copy, not a NaN
    with pytest.raises(StoreCorruptError, match=rf"{rotten.name} does not match the checksum.*computes its images"):
        EmbeddingStore.open(tmp_path, "tiny-fp")
    encoder = Counting(model)
    with caplog.at_level("WARNING", logger="nearid.store"):
        store, _ = build(tmp_path, encoder, items, dtype="float16")
    assert f"{rotten.name} does not match the checksum" in caplog.text and "Dropping it" in caplog.text
    assert encoder.images == 4  # that shard's images, and only those
    values = store.get(list(items))
    assert values.abs().max() < 1e3
    torch.testing.assert_close(values, reference_tokens(model, items, list(items)), rtol=1e-2, atol=1e-2)


def test_a_shard_written_before_checksums_gets_one_without_being_computed_again(model, tmp_path):
    items = make_items(5)
    build(tmp_path, Counting(model), items)
    for path in folder(tmp_path).glob("shard-*.npy"):  # the names of stores written before checksums
        path.rename(path.with_name("-".join(path.name.split("-")[:3]) + ".npy"))
    encoder = Counting(model)
    store, _ = build(tmp_path, encoder, items)
    assert encoder.images == 0 and len(store) == len(items)
    names = sorted(path.name for path in folder(tmp_path).glob("shard-*.npy"))
    assert names and all(len(name.split("-")) == 4 for name in names)  # shard-p000-000000-<checksum>.npy
    EmbeddingStore.open(tmp_path, "tiny-fp")  # and they verify


def test_a_shard_of_another_layout_is_refused(model, tmp_path):
    build(tmp_path, Counting(model), make_items(2))
    np.save(shard(tmp_path, 0), np.zeros(3, dtype=[("key", "S4"), ("values", "<f4", (2,))]))
    with pytest.raises(StoreCorruptError, match="does not match the checksum"):
        EmbeddingStore.open(tmp_path, "tiny-fp")
    with pytest.raises(StoreCorruptError, match="does not belong here"):
        EmbeddingStore.open(tmp_path, "tiny-fp", verify=False)


def test_a_damaged_index_is_rebuilt_from_the_shards(model, tmp_path):
    items = make_items(5)
    build(tmp_path, Counting(model), items)
    (folder(tmp_path) / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not valid JSON"):
        EmbeddingStore.open(tmp_path, "tiny-fp")
    encoder = Counting(model)
    store, _ = build(tmp_path, encoder, items)
    assert encoder.images == 0 and len(store) == len(items)


# --------------------------------------------------------------------------------------------------
# Two runs sharing one store


class Paused(Counting):
    """A Counting encoder that, on its first batch, says it started and waits until it is released."""

    def __init__(self, model):
        super().__init__(model)
        self.started, self.release = threading.Event(), threading.Event()

    def encode(self, pixels):
        self.started.set()
        assert self.release.wait(60), "never released"
        return super().encode(pixels)


def test_a_second_run_on_a_shared_store_waits_then_adds_its_images(model, tmp_path, caplog):
    items = make_items(8)
    first_items = {key: items[key] for key in list(items)[:4]}
    second_items = {key: items[key] for key in list(items)[4:]}
    first, second = Paused(model), Counting(model)
    errors = []

    def run(encoder, part):
        try:
            build(tmp_path, encoder, part)
        except BaseException as error:  # noqa: BLE001 -- reported by the test below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(first, first_items)),
               threading.Thread(target=run, args=(second, second_items))]
    with caplog.at_level("WARNING", logger="nearid.locking"):
        threads[0].start()
        assert first.started.wait(60)  # the first run is computing, its rows not yet written
        threads[1].start()
        assert_waits(threads[1], caplog, "waiting for the embedding store")
        assert second.images == 0, "the second run computed while the first held the store"
        first.release.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    assert "waiting for the embedding store" in caplog.text and f"process {os.getpid()}" in caplog.text
    store = EmbeddingStore.open(tmp_path, "tiny-fp")
    assert sorted(store.keys()) == sorted(items)  # neither run's work was lost
    assert first.images == len(first_items) and second.images == len(second_items)


# --------------------------------------------------------------------------------------------------
# Several processes

# The store is under test, not the model: its encoder is `PatchTokens`, so neither process imports transformers
# (recorded, as a fill with its own loader and encoder needs none).
TWO_PROCESS_SCRIPT = """
import json, sys
import torch
from accelerate import PartialState
from nearid.store.fill import FillOptions, fill
from nearid.store.format import StoreFormat
from tests.helpers import TINY_TOKEN_SHAPE, Counting, PatchTokens, load_pixels, make_items

state = PartialState(cpu=True)
root = sys.argv[1]
items = make_items(9, corrupt=["broken"])
encoder = Counting(PatchTokens())
store, report = fill(root, "tiny-fp", StoreFormat(TINY_TOKEN_SHAPE, "float32"), items, load_pixels, encoder,
                     FillOptions(batch_size=2, shard_size=2, skip_errors=True, progress=False), state)
keys = sorted(key for key in items if key in store)
torch.save({"keys": keys, "tokens": store.get(keys)}, f"{root}/seen-by-{state.process_index}.pt")
with open(f"{root}/result-{state.process_index}.json", "w") as stream:
    json.dump({"num_processes": state.num_processes, "len": len(store), "skipped": report.skipped,
               "computed_here": encoder.images, "computed_in_all": report.images_computed,
               "imported": [name for name in ("transformers", "datasets") if name in sys.modules]}, stream)
"""


def test_two_processes_fill_one_store(tmp_path):
    script = tmp_path / "fill_two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    root = tmp_path / "store"
    # Judged by the files the processes wrote, and by the exit code: 0, or the abort at exit that gloo runs
    # sometimes meet after finishing (helpers.assert_finished).
    code, output = launch(2, [script, root], tmp_path, "fill_two.log")
    logs = textwrap.shorten(output, 4000)
    assert_finished(code, output, all((root / f"{name}-{rank}.{ext}").exists() for rank in (0, 1)
                                      for name, ext in (("result", "json"), ("seen-by", "pt"))))
    items = make_items(9, corrupt=["broken"])
    good = sorted(key for key in items if key != "broken")
    computed = []
    for rank in (0, 1):
        assert (root / f"result-{rank}.json").exists(), logs
        result = json.loads((root / f"result-{rank}.json").read_text())
        assert result["num_processes"] == 2 and result["len"] == len(good)
        assert list(result["skipped"]) == ["broken"] and result["computed_in_all"] == len(good)
        assert result["imported"] == []
        computed.append(result["computed_here"])
        seen = torch.load(root / f"seen-by-{rank}.pt")
        assert seen["keys"] == good
        torch.testing.assert_close(seen["tokens"], reference_tokens(PatchTokens(), items, good), rtol=1e-5, atol=1e-5)
    assert sum(computed) == len(good) and min(computed) > 0  # each image computed by one process only
    assert {path.name.split("-")[1] for path in folder(root).glob("shard-p*.npy")} == {"p000", "p001"}
    index = json.loads((folder(root) / "index.json").read_text())
    assert sorted(key for shard in index["shards"] for key in shard["keys"]) == good
    assert not list(folder(root).glob("report-p*.json"))
