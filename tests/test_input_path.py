"""The training input path: step batches cut rank-major, tokens read ahead by worker processes into a ring
of shared buffers and always the ones the step asked for, a store that travels to workers without its
files, and training that does not change with the number of workers."""

import json
import mmap
import pickle
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader
from safetensors.torch import load_file

import nearid.io
from nearid.commands import train
from nearid import checkpoints
from nearid.store.fill import FillOptions, fill
from nearid.store.format import StoreFormat
from nearid.tokens import PAD_KEY, CachedTokens, TokenRing, check_shared_memory, token_loader
from nearid.training_data import StepSampler
from tests import ring_worker
from tests.helpers import REPO_ROOT, TINY_TOKEN_SHAPE, load_pixels, make_items, make_tiny_nearid, train_args, user_error


class Samples:
    """A stand-in training set: sample i of epoch e shows 6 of `keys` (drawn from (e, i)), the last slot a pad."""

    def __init__(self, keys, num_samples):
        self.keys, self.num_samples = keys, num_samples

    def epoch_order(self, epoch, seed):
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(1000 * seed + epoch)).tolist()

    def sample_slots(self, epoch, index, seed):
        drawn = torch.randint(len(self.keys), (5,), generator=torch.Generator().manual_seed(epoch * 997 + index))
        return [self.keys[i] for i in drawn.tolist()] + [None]


def sampler(samples, start=0, stop=8, processes=1, per_device=3):
    return StepSampler(samples, seed=0, per_device=per_device, num_processes=processes, steps_per_epoch=4,
                       start=start, stop=stop)


# --------------------------------------------------------------------------------------------------
# Which samples each process trains at each step


def test_each_step_is_the_epoch_order_cut_into_rank_major_blocks():
    samples = Samples([f"k{i}" for i in range(10)], num_samples=25)  # 4 global batches of 6, one sample left
    batches = list(sampler(samples, processes=2))
    assert len(batches) == len(sampler(samples, processes=2)) == 16  # 8 steps x 2 processes
    for step in range(8):
        epoch, position = divmod(step, 4)
        order = samples.epoch_order(epoch, 0)
        rank0, rank1 = batches[2 * step], batches[2 * step + 1]
        assert rank0.step == rank1.step == step
        assert rank0.samples + rank1.samples == tuple(order[6 * position:6 * position + 6])
        assert rank0.slots == tuple(tuple(samples.sample_slots(epoch, i, 0)) for i in rank0.samples)


def test_accelerate_hands_each_process_its_block_and_a_resumed_sampler_continues_exactly():
    samples = Samples([f"k{i}" for i in range(10)], num_samples=25)
    full = list(sampler(samples, processes=2))
    for rank in (0, 1):
        shard = list(BatchSamplerShard(sampler(samples, processes=2), num_processes=2, process_index=rank))
        assert shard == full[rank::2]
    resumed = list(sampler(samples, start=5, processes=2))
    assert resumed == full[10:]  # no earlier step drawn


# --------------------------------------------------------------------------------------------------
# The tokens each batch carries


class Encoder:
    def __init__(self):
        self.model = make_tiny_nearid()

    def encode(self, pixels):
        with torch.no_grad():
            return self.model.forward_features(pixels)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    items = {key: value for key, value in make_items(11).items()}  # 11 images and the pad ("pad")
    built, _ = fill(tmp_path_factory.mktemp("store"), "fp", StoreFormat(TINY_TOKEN_SHAPE, "float16"), items,
                    load_pixels, Encoder(), FillOptions(batch_size=4, shard_size=5, progress=False))
    return built


def image_keys(store):
    return [key for key in store.keys() if key != PAD_KEY]


def prepared(loader):
    """The loader as accelerate prepares it for one process (it reads one batch ahead)."""
    return prepare_data_loader(loader, num_processes=1, process_index=0)


def check_batches(loader, provider, store, pause=0.0):
    """Every batch's tokens are its slots' stored tokens; `pause` lets the workers run ahead of a slow step."""
    steps = 0
    for batch in prepared(loader):
        time.sleep(pause)
        tokens, index = provider.batch_tokens(batch)
        keys = [PAD_KEY if key is None else key for sample in batch["slots"] for key in sample]
        assert torch.equal(tokens[index], store.get(keys)), f"batch {steps}"
        assert batch["mask"].tolist() == [[key is not None for key in sample] for sample in batch["slots"]]
        steps += 1
    return steps


@pytest.mark.parametrize("workers, context", [(0, None), (2, "fork"), (2, "spawn")])
def test_every_batch_holds_the_tokens_of_its_slots(store, workers, context):
    provider = CachedTokens(store, "cpu")
    loader = token_loader(provider, sampler(Samples(image_keys(store), 25)), workers, "cpu")
    if context:
        loader.multiprocessing_context = context  # spawn: the store and the ring travel by pickle
    assert check_batches(loader, provider, store, pause=0.05 if workers else 0.0) == 8
    assert len(provider.ring) == 2 * workers + 2


def test_a_ring_with_too_few_buffers_would_be_caught(store, monkeypatch):
    """The check above fails when a worker may overwrite the buffer a step still reads."""
    provider = CachedTokens(store, "cpu")
    real = provider.training_batches
    monkeypatch.setattr(provider, "training_batches", lambda images, buffers: real(images, 1))
    loader = token_loader(provider, sampler(Samples(image_keys(store), 25)), 0, "cpu")
    with pytest.raises(AssertionError, match="batch 0"):
        check_batches(loader, provider, store)


def test_a_store_travels_without_its_files(store):
    data = pickle.dumps(store)
    shard_bytes = sum(path.stat().st_size for path in store.folder.glob("shard-*.npy"))
    assert len(data) < shard_bytes / 10
    keys = store.keys()
    assert torch.equal(pickle.loads(data).get(keys), store.get(keys))


# A spawned loader worker's start: unpickle what the DataLoader sends it, read a batch, say what that imported.
WORKER_READ = """
import json, pickle, sys, types, torch
dataset, collate, init, batch = pickle.load(sys.stdin.buffer)
torch.utils.data.get_worker_info = lambda: types.SimpleNamespace(id=0, dataset=dataset)  # as in worker 0
init(0)  # a worker's start comes before its first batch
batch = collate(dataset.__getitems__(batch))
stored = dataset.ring.fields(batch["buffer"], len(batch["keys"]))
same = torch.equal(dataset.store.format.decode(stored, "cpu"), dataset.store.get(batch["keys"]))
print(json.dumps({"keys": batch["keys"], "same": same, "imported": [m for m in %r if m in sys.modules]}))
""" % (("transformers", "datasets", "accelerate", "image_processing_nearid"),)


def test_a_spawned_worker_reads_its_batch_without_transformers_or_datasets(store):
    """Each import of those costs a spawned worker (macOS, Windows) seconds before its first batch."""
    loader = token_loader(CachedTokens(store, "cpu"), sampler(Samples(image_keys(store), 25)), 2, "cpu")
    batch = next(iter(loader.batch_sampler))
    sent = pickle.dumps((loader.dataset, loader.collate_fn, loader.worker_init_fn, batch))
    done = subprocess.run([sys.executable, "-c", WORKER_READ], input=sent, cwd=REPO_ROOT, capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    read = json.loads(done.stdout.decode().splitlines()[-1])
    assert read["keys"] == list(dict.fromkeys(PAD_KEY if k is None else k for slots in batch.slots for k in slots))
    assert read["same"] and read["imported"] == []


def test_not_enough_shared_memory_names_the_options(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(nearid.io.shutil, "disk_usage", lambda path: usage(10**9, 0, 10**6))
    check_shared_memory(10**6, 4, 8, folder=str(tmp_path))
    with pytest.raises(OSError, match=r"needs 1.00 MB of shared memory \(4 batch buffers of 8 images.*--num-workers"):
        check_shared_memory(10**6 + 1, 4, 8, folder=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Training through the loader


def test_workers_and_int8_tokens_leave_training_unchanged(train_synthetic, base_model, tmp_path):
    """2 worker processes read ahead; the head ends bit for bit where the main process alone takes it."""
    common = ("--no-export", "--cache-dtype", "int8")
    runs = {workers: tmp_path / f"workers{workers}" for workers in (0, 2)}
    for workers, out in runs.items():
        train.main(train_args(train_synthetic, base_model, out, *common, "--num-workers", str(workers)))
    final = [checkpoints.completed(out)[-1] for out in runs.values()]
    assert final[0].name == final[1].name
    a, b = (load_file(folder / "head.safetensors") for folder in final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_token_store_that_does_not_fit_names_the_training_options(train_synthetic, base_model, tmp_path,
                                                                    monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(nearid.io.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "run"
    message = user_error(capsys, train.main, train_args(train_synthetic, base_model, out))
    assert "nothing was computed" in message
    assert "--cache-dtype int8" in message and "--source" in message and "--cache-dir on a larger disk" in message
    assert not list(out.glob("token_cache/*/shard-*"))


# --------------------------------------------------------------------------------------------------
# The ring's pages are mapped once per process, not by each first write


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_process_sharing_the_ring_writes_it_without_a_fault_per_page(context):
    fmt = StoreFormat((256, 1024), "float16")
    control, mapped = (TokenRing(fmt, 2, 32) for _ in range(2))  # 32 MiB each: 8,192 pages of 4 KiB
    pages = sum(t.numel() * t.element_size() for t in control.buffers.values()) // mmap.PAGESIZE
    multiprocessing = torch.multiprocessing.get_context(context)
    results = multiprocessing.Queue()
    # One child writes both rings: its target's module imports nothing the ring does not need.
    child = multiprocessing.Process(target=ring_worker.write_faults, args=(control, mapped, results))
    child.start()
    faults = results.get(timeout=60)
    child.join()
    assert faults[False] >= pages  # the control: without it, every page faults once
    assert faults[True] < pages / 10  # the rest: the interpreter's own


def test_each_loader_worker_maps_the_ring_before_its_first_batch(store, monkeypatch):
    calls = torch.multiprocessing.get_context("fork").Value("i", 0)
    real = TokenRing.prefault

    def counted(ring):
        with calls.get_lock():
            calls.value += 1
        return real(ring)

    monkeypatch.setattr(TokenRing, "prefault", counted)
    provider = CachedTokens(store, "cpu")
    loader = token_loader(provider, sampler(Samples(image_keys(store), 25)), 2, "cpu")
    assert calls.value == 1  # the main process allocates the ring
    loader.multiprocessing_context = "fork"  # the counting prefault reaches the workers
    assert check_batches(loader, provider, store) == 8
    assert calls.value == 3  # and each of the 2 workers maps it once
