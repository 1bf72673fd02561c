"""Backbone token cache: cached tokens equal the live backbone, nothing is computed twice, failures are clear."""

import json
import os
import subprocess
import sys
import textwrap
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import TINY_VISION, load_pixels, make_items, make_tiny_nearid, python_path

from nearid import token_cache
from nearid.token_cache import (
    CacheMismatchError,
    NotEnoughDiskSpace,
    TokenCache,
    check_free_space,
    estimate_cache_bytes,
    quantize_int8,
)

NUM_TOKENS = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2
HIDDEN = TINY_VISION["hidden_size"]


def reference_tokens(model, items, keys):
    with torch.no_grad():
        return model.forward_features(torch.stack([load_pixels(items[key]) for key in keys]))


def count_forwards(model, fail_after_batches=None):
    """Wrap `model.forward_features` to count the images it sees (and optionally raise on a later batch)."""
    seen = {"images": 0, "batches": 0}
    original = model.forward_features

    def forward_features(pixels):
        if fail_after_batches is not None and seen["batches"] == fail_after_batches:
            raise RuntimeError("simulated interruption")
        seen["images"] += len(pixels)
        seen["batches"] += 1
        return original(pixels)

    model.forward_features = forward_features
    return seen


def build(folder, model, items, **kwargs):
    kwargs = {"fingerprint": "tiny-fp", "shard_size": 4, "batch_size": 3, "progress": False, **kwargs}
    return TokenCache.build(folder, model, items, load_pixels, **kwargs)


@pytest.fixture
def model():
    return make_tiny_nearid()


def shuffled_keys(items):
    keys = list(items)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0)).tolist()
    return [keys[i] for i in order] + keys[:2]  # random order, with repeats


def test_float32_cache_equals_forward_features(model, tmp_path):
    items = make_items(9)
    cache, skipped = build(tmp_path / "cache", model, items, dtype="float32")
    assert skipped == {}
    assert len(cache) == len(items) and all(key in cache for key in items) and "unknown" not in cache
    assert (cache.num_tokens, cache.hidden, cache.dtype) == (NUM_TOKENS, HIDDEN, "float32")
    keys = shuffled_keys(items)
    tokens = cache.get(keys)
    assert tokens.dtype == torch.float32 and tokens.shape == (len(keys), NUM_TOKENS, HIDDEN)
    torch.testing.assert_close(tokens, reference_tokens(model, items, keys), rtol=1e-5, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("tokens-p000-*.npy"))) == 3  # 10 images in shards of 4


def test_reopened_cache_serves_the_same_tokens(model, tmp_path):
    items = make_items(5)
    cache, _ = build(tmp_path, model, items, dtype="float16")
    reopened = TokenCache.open(tmp_path, "tiny-fp")
    assert len(reopened) == len(cache)
    assert torch.equal(reopened.get(list(items)), cache.get(list(items)))


def test_float16_cache_within_float16_rounding(model, tmp_path):
    items = make_items(6)
    cache, _ = build(tmp_path, model, items, dtype="float16")
    keys = shuffled_keys(items)
    expected = reference_tokens(model, items, keys)
    tokens = cache.get(keys)
    torch.testing.assert_close(tokens, expected, rtol=2**-10, atol=1e-5)
    assert not torch.equal(tokens, expected)  # really stored in half precision


def test_int8_cache_within_quantisation_error(model, tmp_path):
    items = make_items(6)
    cache, _ = build(tmp_path, model, items, dtype="int8")
    keys = list(items)
    expected = reference_tokens(model, items, keys)
    error = cache.get(keys) - expected
    scales = expected.abs().amax(dim=-1) / 127
    assert (error.abs().amax(dim=-1) <= scales / 2 + 1e-5).all()
    relative = error.norm(dim=-1) / expected.norm(dim=-1)
    assert relative.max() < 0.01


def test_quantize_int8_round_trip():
    tokens = torch.randn(2, 5, 64) * torch.tensor([0.01, 1.0, 30.0, 1.0, 1.0])[None, :, None]
    tokens[1, 3] = 0  # an all-zero token must not divide by zero
    values, scales = quantize_int8(tokens)
    assert values.dtype == torch.int8 and scales.shape == (2, 5)
    assert values.abs().amax(dim=-1).tolist() == [[127] * 5, [127, 127, 127, 0, 127]]
    restored = values.float() * scales[..., None]
    assert (restored - tokens).abs().le(scales[..., None] / 2 + 1e-7).all()
    assert torch.equal(restored[1, 3], torch.zeros(64))


def test_head_on_cached_tokens_equals_image_features(model, tmp_path):
    items = make_items(5)
    cache, _ = build(tmp_path, model, items, dtype="float32")
    keys = list(items)
    with torch.no_grad():
        from_cache = F.normalize(model.forward_head(cache.get(keys)), dim=-1)
        live = model.get_image_features(torch.stack([load_pixels(items[key]) for key in keys]))
    torch.testing.assert_close(from_cache, live, rtol=1e-5, atol=1e-5)


def test_rebuild_computes_only_missing_images(model, tmp_path):
    items = make_items(7)
    build(tmp_path, model, items)
    calls = count_forwards(model)
    cache, _ = build(tmp_path, model, items)
    assert calls["images"] == 0 and len(cache) == len(items)

    more = {**items, **{f"new-{i}": {"seed": 500 + i, "where": f"new {i}"} for i in range(3)}}
    cache, _ = build(tmp_path, model, more, dtype="float16")
    assert calls["images"] == 3 and len(cache) == len(more)
    torch.testing.assert_close(cache.get(list(more)), reference_tokens(model, more, list(more)), rtol=2**-10, atol=1e-5)


def test_interrupted_build_resumes_with_the_rest(model, tmp_path):
    items = make_items(10)  # 11 images, batches of 2, shards of 4
    calls = count_forwards(model, fail_after_batches=3)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        build(tmp_path / "cache", model, items, dtype="float32", batch_size=2)
    assert calls["images"] == 6
    kept = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "cache").glob("tokens-*.npy")}
    assert len(kept) == 2  # the full shard of 4 and the 2 rows computed before the interruption
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="did not finish.*TokenCache.build"):
        TokenCache.open(tmp_path / "cache", "tiny-fp")

    model = make_tiny_nearid()  # as a new process would: same weights, no interruption this time
    calls = count_forwards(model)
    resumed, _ = build(tmp_path / "cache", model, items, dtype="float32", batch_size=2)
    assert calls["images"] == len(items) - 6
    assert kept == {
        path.name: path.stat().st_mtime_ns for path in (tmp_path / "cache").glob("tokens-*.npy") if path.name in kept
    }
    uninterrupted, _ = build(tmp_path / "reference", make_tiny_nearid(), items, dtype="float32", batch_size=2)
    keys = list(items)
    torch.testing.assert_close(resumed.get(keys), uninterrupted.get(keys), rtol=1e-6, atol=1e-6)


def test_deleted_shard_is_recomputed_under_a_new_name(model, tmp_path):
    items = make_items(9)  # 10 images in shards of 4, 4, 2
    build(tmp_path, model, items, dtype="float32")
    (tmp_path / "tokens-p000-000002.npy").unlink()
    calls = count_forwards(model, fail_after_batches=1)  # one image recomputed, then interrupted
    with pytest.raises(RuntimeError, match="simulated interruption"):
        build(tmp_path, model, items, dtype="float32", batch_size=1)
    # index.json still lists the deleted name with two keys; the new one-row shard must not take it
    assert sorted(path.name for path in tmp_path.glob("tokens-*.npy"))[-1] == "tokens-p000-000003.npy"

    model = make_tiny_nearid()
    calls = count_forwards(model)
    cache, _ = build(tmp_path, model, items, dtype="float32")
    assert calls["images"] == 1 and len(cache) == len(items)
    keys = list(items)
    torch.testing.assert_close(cache.get(keys), reference_tokens(model, items, keys), rtol=1e-5, atol=1e-5)


def test_fingerprint_mismatch_is_an_error(model, tmp_path):
    build(tmp_path, model, make_items(3), fingerprint="weights-a/proc-1/float16")
    with pytest.raises(CacheMismatchError, match="'weights-a/proc-1/float16', not 'weights-b/proc-1/float16'"):
        TokenCache.open(tmp_path, "weights-b/proc-1/float16")
    calls = count_forwards(model)
    with pytest.raises(CacheMismatchError, match="Use another folder"):
        build(tmp_path, model, make_items(4), fingerprint="weights-b/proc-1/float16")
    assert calls["images"] == 0


def test_dtype_change_under_the_same_fingerprint_is_an_error(model, tmp_path):
    build(tmp_path, model, make_items(2), dtype="float16")
    with pytest.raises(CacheMismatchError, match="holds float16 tokens.*makes int8 tokens"):
        build(tmp_path, model, make_items(2), dtype="int8")


@pytest.mark.parametrize("dtype, scale", [("float16", 1e6), ("int8", float("nan"))])
def test_tokens_that_cannot_be_stored_are_an_error(model, tmp_path, dtype, scale):
    original = model.forward_features
    model.forward_features = lambda pixels: original(pixels) * scale
    with pytest.raises(ValueError, match=f"Backbone tokens of \\['img-00'.* not finite when stored as {dtype}"):
        build(tmp_path, model, make_items(2), dtype=dtype)


def test_not_enough_disk_space_stops_before_computing(model, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(token_cache.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    calls = count_forwards(model)
    needed = estimate_cache_bytes(5, NUM_TOKENS, HIDDEN, "float16")
    with pytest.raises(NotEnoughDiskSpace, match=f"needs {needed} bytes .* has 1000 bytes .* free.*dtype='int8'"):
        build(tmp_path / "cache", model, make_items(4))
    assert calls["images"] == 0 and not list((tmp_path / "cache").glob("tokens-*"))


def test_check_free_space_on_a_folder_not_created_yet(tmp_path, monkeypatch):
    seen = []
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(token_cache.shutil, "disk_usage", lambda path: seen.append(path) or usage(0, 0, 500))
    check_free_space(tmp_path / "a" / "b", 500)
    with pytest.raises(NotEnoughDiskSpace) as raised:
        check_free_space(tmp_path / "a" / "b", 501)
    assert isinstance(raised.value, OSError) and "needs 501 bytes" in str(raised.value)
    assert seen == [tmp_path, tmp_path]


def test_corrupt_image_names_the_item(model, tmp_path):
    items = make_items(4, corrupt=["broken"])
    with pytest.raises(ValueError, match="'broken'.*pairs row broken column image.*skip_errors=True"):
        build(tmp_path, model, items)


def test_skip_errors_leaves_the_image_out_and_reports_it(model, tmp_path):
    items = make_items(4, corrupt=["broken"])
    cache, skipped = build(tmp_path, model, items, skip_errors=True, num_workers=2)
    assert list(skipped) == ["broken"] and "pairs row broken column image" in skipped["broken"]
    assert "broken" not in cache and len(cache) == len(items) - 1
    good = [key for key in items if key != "broken"]
    torch.testing.assert_close(cache.get(good), reference_tokens(model, items, good), rtol=2**-10, atol=1e-5)
    with pytest.raises(KeyError, match="'broken' is not in the token cache"):
        cache.get(["img-00", "broken"])

    calls = count_forwards(model)
    _, skipped_again = build(tmp_path, model, items, skip_errors=True)  # retried: the file may have been fixed
    assert calls["images"] == 0 and list(skipped_again) == ["broken"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_estimate_matches_size_on_disk(model, tmp_path, dtype):
    items = make_items(9)
    build(tmp_path, model, items, dtype=dtype)
    estimate = estimate_cache_bytes(len(items), NUM_TOKENS, HIDDEN, dtype)
    shards = list(tmp_path.glob("tokens-*.npy"))
    shard_bytes = sum(path.stat().st_size for path in shards)
    key_bytes = sum(len(key) for key in items)  # upper bound: each shard pads keys to its longest
    assert estimate <= shard_bytes <= estimate + len(items) * max(map(len, items)) + 512 * len(shards)
    assert shard_bytes - estimate >= key_bytes
    folder_bytes = sum(path.stat().st_size for path in tmp_path.iterdir())
    assert folder_bytes <= 1.05 * estimate


def test_estimate_for_so400m():
    assert estimate_cache_bytes(1, 729, 1152, "float16") == 729 * 1152 * 2  # 1.68 MB, SPEC §5
    assert estimate_cache_bytes(10, 729, 1152, "int8") == 10 * 729 * (1152 + 4)
    assert estimate_cache_bytes(3, 729, 1152, "float32") == 3 * 729 * 1152 * 4
    with pytest.raises(ValueError, match="must be one of.*'bfloat16'"):
        estimate_cache_bytes(1, 729, 1152, "bfloat16")


def test_open_without_a_cache_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No backbone token cache.*TokenCache.build"):
        TokenCache.open(tmp_path, "tiny-fp")


def test_build_restores_training_mode(model, tmp_path):
    model.train()
    build(tmp_path, model, make_items(2))
    assert model.training


TWO_PROCESS_SCRIPT = """
import json, sys
import torch
from accelerate import PartialState
from tests.helpers import load_pixels, make_items, make_tiny_nearid
from nearid.token_cache import TokenCache

state = PartialState(cpu=True)
folder = sys.argv[1]
items = make_items(9, corrupt=["broken"])
cache, skipped = TokenCache.build(folder, make_tiny_nearid(), items, load_pixels, "tiny-fp", dtype="float32",
                                  shard_size=2, batch_size=2, skip_errors=True, state=state, progress=False)
keys = sorted(key for key in items if key in cache)
torch.save({"keys": keys, "tokens": cache.get(keys)}, f"{folder}/tokens-seen-by-{state.process_index}.pt")
with open(f"{folder}/result-{state.process_index}.json", "w") as stream:
    json.dump({"num_processes": state.num_processes, "len": len(cache), "skipped": skipped}, stream)
"""


def test_two_process_build(model, tmp_path):
    script = tmp_path / "build_two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    folder = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path()}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(folder)]
    # Judged by the files the processes wrote: gloo runs sometimes abort at exit after finishing.
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    logs = textwrap.shorten(finished.stdout + finished.stderr, 4000)
    items = make_items(9, corrupt=["broken"])
    good = sorted(key for key in items if key != "broken")
    for rank in (0, 1):
        assert (folder / f"result-{rank}.json").exists(), logs
        result = json.loads((folder / f"result-{rank}.json").read_text())
        assert result["num_processes"] == 2
        assert result["len"] == len(good) and list(result["skipped"]) == ["broken"]
        seen = torch.load(folder / f"tokens-seen-by-{rank}.pt")
        assert seen["keys"] == good
        torch.testing.assert_close(seen["tokens"], reference_tokens(model, items, good), rtol=1e-5, atol=1e-5)
    writers = {path.name.split("-")[1] for path in folder.glob("tokens-p*.npy")}
    assert writers == {"p000", "p001"}
    index = json.loads((folder / "index.json").read_text())
    indexed = [key for shard in index["shards"] for key in shard["keys"]]
    assert sorted(indexed) == good  # each image computed by one process only
    assert not list(folder.glob("skipped-p*.json"))
