"""Pieces shared by the input-path benchmarks and the GPU check (bench_token_loader.py,
bench_embedding_pipeline.py, gpu_check.py): a synthetic token store, step batches over it, the head's
training step, timed passes of the training loader, plain and cold reads of files, and the embedding
pipeline from JPEG files (random NearID models, decode rate, end to end against forward only)."""

import gc
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.data_loader import prepare_data_loader
from bench_common import synchronize, timed
from PIL import Image, ImageDraw

from image_processing_nearid import NearIDImageProcessor
from modeling_nearid import NearIDModel
from nearid.commands.train import TrainingArguments
from nearid.evaluation.protocol import embed_images
from nearid.hub import export_hub_folder
from nearid.images import PixelLoader
from nearid.store.embedding_store import EmbeddingStore
from nearid.store.fill import FillOptions, fill
from nearid.store.format import StoreFormat
from nearid.store.image_index import ImageIndex
from nearid.tokens import CachedTokens, token_loader
from nearid.training.loop import steps_only_run, train_step
from nearid.training.tracking import make_accelerator
from nearid.training_data import SLOT_NAMES, StepSampler

SLOTS = len(SLOT_NAMES)
READ_CHUNK = 16 * 2**20


def write_json(path, figures: dict) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")


# --- a token store of random so400m-sized rows ------------------------------------------------------


class RandomTokens:
    """A store encoder whose "pixels" are image numbers: -> random tokens of `shape`, fixed by the number."""

    def __init__(self, shape):
        self.shape = shape

    def encode(self, numbers: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(numbers[0]))
        return torch.randn(len(numbers), *self.shape, generator=generator)


class Precomputed:
    """A store encoder of no cost (`seconds` = 0) or of a fixed cost per batch, as a GPU forward costs the CPU
    nothing while it runs: the same random tokens of `shape` for every batch of up to `batch` images."""

    def __init__(self, shape, batch: int, seconds: float = 0.0):
        self.values, self.seconds = torch.randn(batch, *shape), seconds

    def encode(self, numbers: torch.Tensor) -> torch.Tensor:
        if self.seconds:
            time.sleep(self.seconds)
        return self.values[:len(numbers)]


def image_number(item) -> torch.Tensor:
    return torch.tensor(item)


def token_store(folder, images: int, shape=(729, 1152), dtype="float16", shard_size=256):
    """A store of `images` random token rows (keys "image-0000000", ...) written by the store's own writer."""
    items = {f"image-{i:07d}": i for i in range(images)}
    store, _ = fill(folder, f"random-{shape}-{dtype}", StoreFormat(shape, dtype), items, image_number,
                    RandomTokens(shape), FillOptions(batch_size=64, shard_size=shard_size, progress=False))
    return store


class EpochSamples:
    """A stand-in training set over `keys`: each epoch shuffles them and sample i shows images 6i to 6i+5,
    so a pass over an epoch reads every image once (a cold read is never helped by a repeat)."""

    def __init__(self, keys):
        self.keys = list(keys)
        self._epoch, self._order = None, None

    def __len__(self) -> int:
        return len(self.keys) // SLOTS

    def epoch_order(self, epoch: int, seed: int) -> list:
        return np.random.default_rng([seed, epoch]).permutation(len(self)).tolist()

    def sample_slots(self, epoch: int, index: int, seed: int) -> list:
        if self._epoch != epoch:
            self._epoch, self._order = epoch, np.random.default_rng([seed, epoch, 1]).permutation(len(self.keys))
        return [self.keys[i] for i in self._order[SLOTS * index:SLOTS * index + SLOTS]]


def step_sampler(samples: EpochSamples, per_device: int, steps: int) -> StepSampler:
    return StepSampler(samples, 0, per_device, 1, len(samples) // per_device, 0, steps)


def training_loader(store, samples, per_device: int, steps: int, workers: int, device):
    """train.py's loader for one process (accelerate prepares it: it reads one batch ahead), and its provider."""
    provider = CachedTokens(store, device)
    loader = token_loader(provider, step_sampler(samples, per_device, steps), workers, device)
    return prepare_data_loader(loader, device=torch.device(device), num_processes=1, process_index=0,
                               put_on_device=True, non_blocking=True), provider


# --- reads ------------------------------------------------------------------------------------------


def shard_files(folder) -> list:
    return sorted(Path(folder).glob("shard-*.npy"))


def drop_from_page_cache(paths) -> None:
    """Make the next read of `paths` come from the disk: posix_fadvise(DONTNEED) on each (written, fsynced) file."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read_rate(paths, cold: bool, buffer_bytes: int = READ_CHUNK) -> float:
    """GB/s of a plain sequential read of `paths` from the disk when `cold`: 16 MiB reads, each into the next
    16 MiB of a buffer of `buffer_bytes` (written before the clock starts), from its start again at its end.

    With the default, every read lands in the same 16 MiB, which the CPU's caches can hold; a buffer as
    large as a loader batch makes every byte read go to memory, as the loader's rows do.
    """
    if cold:
        drop_from_page_cache(paths)
    buffer = memoryview(np.ones(max(READ_CHUNK, buffer_bytes) // READ_CHUNK * READ_CHUNK, np.uint8))

    def read_all():
        total, place = 0, 0
        for path in paths:
            with open(path, "rb", buffering=0) as stream:
                while count := stream.readinto(buffer[place:place + READ_CHUNK]):
                    total, place = total + count, (place + READ_CHUNK) % len(buffer)
        return total

    total, seconds = timed(read_all)
    return total / seconds / 1e9


def children_cpu_seconds() -> float:
    """CPU seconds used so far by the live child processes of this one (Linux's /proc; 0 elsewhere)."""
    total, me = 0, str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if fields[1] == me:  # fields: state, ppid, ..., utime (12th), stime (13th), in clock ticks
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU seconds of this process and its children, live or ended: a cost the machine's other load does not count."""
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ended.ru_utime + ended.ru_stime + children_cpu_seconds()


def loader_read_rate(store, samples, per_device: int, steps: int, workers: int, cold: bool) -> tuple:
    """(GB/s of stored token rows the training loader delivers into its ring, the step itself doing nothing;
    seconds to its first batch; GB per CPU-second of the main process and its workers; seconds of the
    workers' end).

    The store is opened afresh: pages a live memory map of this process holds cannot be dropped from
    the page cache, so a cold pass needs maps that have read nothing yet. The rate is timed from the
    first batch to batch `steps - 1`, as in the middle of a run: the loader's sampler goes on beyond it,
    so its workers are still reading ahead there, as they were at the first batch. The workers' start
    (once per run: the sampler spans the run) is the second figure, from the loader's creation (its ring
    allocated) to the first batch; their end (once per run too: each unmaps the ring and the shards, and
    the loader joins them) the fourth, from the last timed batch until the loader is gone.
    """
    created = time.perf_counter()
    store = EmbeddingStore.open(store.root, store.fingerprint)
    loader, _ = training_loader(store, samples, per_device, steps + 2 * workers + 2, workers, "cpu")
    if cold:
        drop_from_page_cache(shard_files(store.folder))
    images, item_bytes = 0, store.format.bytes_per_item
    for number, batch in enumerate(loader):
        if number == 0:
            start, cpu_start = time.perf_counter(), cpu_seconds()  # the workers' time so far is in /proc
            continue
        images += len(batch["keys"])
        if number == max(1, steps - 1):
            last, cpu = time.perf_counter(), cpu_seconds()
            break
    del loader, batch, store
    gc.collect()  # ends the workers and unmaps the shards before the next pass drops them from the page cache
    ended = time.perf_counter()
    if steps < 2:  # a single batch: nothing after the first to time (too few images for the steps)
        return float("nan"), start - created, float("nan"), ended - last
    gigabytes = images * item_bytes / 1e9
    return gigabytes / (last - start), start - created, gigabytes / (cpu - cpu_start), ended - last


# --- the head's training step -----------------------------------------------------------------------


def head_step(run, provider, batch) -> float:
    """One training step of the head: train.py's own `train_step` (embeddings, loss, backward, clip, AdamW,
    schedule), on `provider`'s tokens."""
    run.provider = provider
    loss = train_step(run, 0, batch)
    run.global_step += 1
    return loss.total.item()  # waits for the step, as train_step's finiteness check does


def step_run(model, precision: str, steps: int):
    """A training run of train.py's defaults (AdamW, warmup and cosine schedule, clip) that takes only steps."""
    args = TrainingArguments(mixed_precision=precision, report_to="none")
    return steps_only_run(args, make_accelerator(args), model, None, steps)


class Resident(CachedTokens):
    """Head inputs already in memory on the device: the rows of a few batches as stored, read before any
    step is timed; the step widens and checks them as it does the loader's."""

    def __init__(self, store, batches, device):
        super().__init__(store, device)
        self.batches = []
        for batch in batches:
            fields = store.format.empty(len(batch["keys"]))
            store.read_into(batch["keys"], fields)
            fields = {name: torch.as_tensor(array).to(self.device) for name, array in fields.items()}
            self.batches.append((fields, batch["keys"], batch["index"]))
        self.calls = 0

    def batch_tokens(self, batch):
        fields, keys, index = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return self.widen(fields, keys), index


def loader_fed_seconds(run, store, samples, per_device, steps, workers) -> tuple:
    """Seconds of `steps` head steps fed by the training loader, after two warm-up steps; and those two batches."""
    model = run.model
    loader, provider = training_loader(store, samples, per_device, steps + 2, workers, model.device)
    warm_up = []
    for number, batch in enumerate(loader):
        if number == 2:  # allocator, kernels and the workers' start are behind us
            synchronize()
            start = time.perf_counter()
        head_step(run, provider, batch)
        if number < 2:
            warm_up.append(batch)
    synchronize()
    return time.perf_counter() - start, warm_up


def resident_seconds(run, store, batches, steps) -> float:
    """Seconds of `steps` head steps on `batches` whose rows are already in memory on the device."""
    model = run.model
    resident = Resident(store, batches, model.device)
    for batch in batches:  # warm-up
        head_step(run, resident, batch)
    return timed(lambda: [head_step(run, resident, batches[number % len(batches)]) for number in range(steps)])[1]


def step_rates(model, store, samples, per_device: int, steps: int, workers: int, precision: str,
               rounds: int = 3) -> dict:
    """Head steps/s fed by the training loader, and fed from tokens already in memory (same step, same sizes).

    The two alternate for `rounds` rounds and each keeps its best round, so a burst of other work on a
    shared machine does not decide the ratio.
    """
    run = step_run(model, precision, rounds * (2 * steps + 4))
    loaded, resident = [], []
    for _ in range(rounds):
        seconds, batches = loader_fed_seconds(run, store, samples, per_device, steps, workers)
        loaded.append(seconds)
        resident.append(resident_seconds(run, store, batches, steps))
    return {"loader_steps_per_s": steps / min(loaded), "resident_steps_per_s": steps / min(resident),
            "overlap": min(resident) / min(loaded)}


# --- image files ------------------------------------------------------------------------------------


def write_jpegs(folder, count: int, side: int) -> list:
    """`count` JPEG files (quality 90) of `side` x `side` pixels: a smooth background and a few shapes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    across, down = np.meshgrid(np.linspace(0, 30, side), np.linspace(0, 30, side))
    paths = []
    for number in range(count):
        a, b, c = rng.uniform(40, 220, 3)
        pixels = np.stack([a + across, b + down, np.full_like(across, c)], axis=-1)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            left, top = (int(v) for v in rng.integers(0, side, 2))
            size = int(rng.integers(side // 10, side // 3))
            draw.ellipse((left, top, left + size, top + size), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = folder / f"image-{number:06d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def nearid_folder(folder, config, seed: int = 0) -> Path:
    """A random NearID of `config` exported as a Hub folder (what `Scorer` loads), processor at its size."""
    torch.manual_seed(seed)
    side = config.vision_config["image_size"]
    processor = NearIDImageProcessor(size={"height": side, "width": side})
    return export_hub_folder(NearIDModel(config), processor, folder)


def decode_rate(processor, paths) -> float:
    """images/s of one process decoding and preprocessing `paths`: what one DataLoader worker does."""
    loader = PixelLoader(processor)
    _, seconds = timed(lambda: [loader((str(path), f"image file {path}")) for path in paths])
    return len(paths) / seconds


def end_to_end_rate(scorer, paths, batch_size: int, workers: int, cache_dir) -> float:
    """images/s of evaluate.py's embedding of image files: decode and preprocess (in `workers`), forward, store."""
    index = ImageIndex()
    index.add_files(paths)  # hashing the files is not timed
    options = FillOptions(batch_size=batch_size, num_workers=workers, device=str(scorer.device), progress=False)
    size = scorer.processor.size
    scorer.encode(torch.zeros(batch_size, 3, size["height"], size["width"]))  # warm-up, as forward_rate's
    embedded, seconds = timed(lambda: embed_images(scorer, index, cache_dir, options))
    assert embedded.stats["images_embedded"] == len(paths)
    return len(paths) / seconds


def forward_rate(scorer, paths, batch_size: int) -> float:
    """images/s of `scorer.encode` alone, on the same images already decoded and preprocessed, in the same batches."""
    loader = PixelLoader(scorer.processor)
    pixels = torch.stack([loader((str(path), str(path))) for path in paths])
    batches = [pixels[start:start + batch_size].to(scorer.device) for start in range(0, len(paths), batch_size)]
    scorer.encode(batches[0])  # warm-up
    _, seconds = timed(lambda: [scorer.encode(batch) for batch in batches])
    return len(paths) / seconds
