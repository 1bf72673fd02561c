"""Training samples of the NearID recipe: which 6 images each sample shows in each epoch (docs/method.md 2, 3).

A sample is 6 image slots `[anchor, pos1, pos2, neg_a, neg_p1, neg_p2]`, where `neg_s` is the
distractor inpainted into the *same scene* as positive slot s, and `PAD` (None) marks an empty slot.
Slots hold image keys: the sha256 of the encoded image (`images.content_hash`), which is also
the key of the token and embedding caches.

- NearID rows: the positives joined by row index with the distractor sources. Per epoch the present
  views are shuffled (first = anchor, then pos1, pos2; pos2 is padded for 2-view rows) and each
  present slot draws its distractor source among the sources that have a distractor for that view.
  A view that no source has a distractor for gets a padded negative: borrowing another scene's
  distractor would teach the model to separate backgrounds instead of identities.
  Rows with fewer than 2 present views cannot form a positive pair; they are excluded and counted.
- MTG rows: positives `[orig1, orig2, pad]`, negatives `[inp1, inp2, pad]` under the same anchor
  shuffle, so neg_a is the inpainted version of the anchor's image. MTG enters `mtg_repeats` times
  (the reference concatenates it 4 times with NearID); each repeat is its own sample with its own
  draws.

Every draw comes from a generator seeded by (seed, epoch, kind, dataset row, repeat): a sample's
slots do not depend on which other samples exist or in which order they are visited, so a run is
reproducible and can resume mid-epoch, and adding or removing rows leaves the other rows' draws
unchanged. Building reads and hashes encoded bytes only; nothing is decoded, and no image bytes are
kept in memory (`ImageIndex` reads an image again when asked for it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from nearid.cli import lazy_module
from nearid.data.split_files import check_disjoint, check_indices

# Only building a training set reads datasets and hashes images. The training loader's worker
# processes import this module for the step batches, and must not pay for datasets, the image
# processor and transformers (seconds per spawned worker) to do so.
readers, image_index = lazy_module("nearid.data.readers"), lazy_module("nearid.store.image_index")
logger = logging.getLogger(__name__)

PAD = None
SLOT_NAMES = ("anchor", "pos1", "pos2", "neg_a", "neg_p1", "neg_p2")
MTG_VIEW_COLUMNS = ("image_1_original", "image_2_original")
MTG_NEGATIVE_COLUMNS = ("image_1_inpainted", "image_2_inpainted")
POSITIVE_SLOTS = 3
# Leading tags of the seed entropy. SeedSequence pads short entropy with zeros, so streams for
# different purposes differ in their first word rather than in their length.
_SLOT_STREAM, _ORDER_STREAM = 1, 2
_KIND_IDS = {"nearid": 0, "mtg": 1}


@dataclass(frozen=True)
class TrainingSample:
    """One sample before the per-epoch draws.

    `views`: 3 image keys in dataset order (img1..3, or orig1, orig2 and a pad for MTG), None where
    missing. `distractors[k]`: `((source, key), ...)` of the present distractors in view k's scene
    (for MTG the one inpainted image, source "mtg"). `repeat` numbers the MTG repeats (0 for NearID).
    """

    kind: str
    row: int
    repeat: int
    views: tuple
    distractors: tuple


@dataclass
class TrainingSet:
    """Samples of one training run and the images they use; see the module docstring for the layout."""

    items: image_index.ImageIndex
    samples: tuple
    sources: tuple
    excluded_rows: dict
    mtg_repeats: int
    dropped_images: int = 0

    def __len__(self) -> int:
        """Samples per epoch: kept NearID rows + mtg_repeats * kept MTG rows."""
        return len(self.samples)

    def sample_slots(self, epoch: int, index: int, seed: int) -> list:
        """The 6 keys `[anchor, pos1, pos2, neg_a, neg_p1, neg_p2]` of sample `index` in `epoch` (PAD = None)."""
        if not 0 <= index < len(self.samples):
            raise IndexError(f"sample index {index} is out of range for a training set of {len(self.samples)} samples")
        sample = self.samples[index]
        rng = _generator(_SLOT_STREAM, seed, epoch, _KIND_IDS[sample.kind], sample.row, sample.repeat)
        order = rng.permutation([k for k, key in enumerate(sample.views) if key is not None])
        positives = [sample.views[k] for k in order]
        negatives = [_draw(sample.distractors[k], rng) for k in order]
        padding = [PAD] * (POSITIVE_SLOTS - len(order))
        return positives + padding + negatives + padding

    def epoch_order(self, epoch: int, seed: int) -> list:
        """The order in which `epoch` visits the sample indices: a permutation fixed by (seed, epoch)."""
        return _generator(_ORDER_STREAM, seed, epoch).permutation(len(self.samples)).tolist()

    def used_keys(self, epochs: Iterable[int], seed: int) -> set:
        """Every key (no PAD) that some sample uses in `epochs`: the images the token cache needs."""
        keys = set()
        for epoch in epochs:
            for index in range(len(self.samples)):
                keys.update(self.sample_slots(epoch, index, seed))
        keys.discard(PAD)
        return keys

    def drop_images(self, keys: set) -> None:
        """Treat `keys` (e.g. images that cannot be decoded) as missing from now on.

        A dropped view leaves its scene (and that scene's distractors) out; a dropped distractor is
        no longer drawn; samples left with fewer than 2 views are excluded and counted. Other
        samples keep their draws, since draws follow the sample's row, not its index.
        """
        keys = set(keys)
        kept, excluded = [], {kind: 0 for kind in self.excluded_rows}
        for sample in self.samples:
            views = tuple(PAD if key in keys else key for key in sample.views)
            if _present(views) < 2:
                excluded[sample.kind] += sample.repeat == 0  # count each MTG row once
                continue
            distractors = tuple(tuple(c for c in candidates if c[1] not in keys) if key is not None else ()
                                for key, candidates in zip(views, sample.distractors))
            kept.append(TrainingSample(sample.kind, sample.row, sample.repeat, views, distractors))
        if not kept:
            raise ValueError(f"dropping {len(keys)} images leaves no training sample with 2 or more views")
        self.samples = tuple(kept)
        self.excluded_rows = {kind: count + excluded[kind] for kind, count in self.excluded_rows.items()}
        self.dropped_images += len(keys & set(self.items))
        self.items.retain({key for sample in kept for key in _sample_keys(sample)})

    def describe(self) -> dict:
        """Counts for logs and run reports (flat, stable keys)."""
        nearid = [s for s in self.samples if s.kind == "nearid"]
        mtg_rows = {s.row for s in self.samples if s.kind == "mtg"}
        return {
            "samples": len(self.samples),
            "nearid_rows": len(nearid),
            "nearid_two_view_rows": sum(_present(s.views) == 2 for s in nearid),
            "nearid_excluded_rows": self.excluded_rows["nearid"],
            "nearid_views_without_distractor": sum(key is not None and not candidates for s in nearid
                                                   for key, candidates in zip(s.views, s.distractors)),
            "mtg_rows": len(mtg_rows),
            "mtg_excluded_rows": self.excluded_rows["mtg"],
            "mtg_repeats": self.mtg_repeats,
            "sources": list(self.sources),
            "images": len(self.items),
            "dropped_images": self.dropped_images,
        }


def slot_mask(slots: Sequence) -> list:
    """True for each slot holding an image, False for PAD."""
    return [slot is not PAD for slot in slots]


@dataclass(frozen=True)
class StepBatch:
    """One process's batch of one global step: its sample indices and their 6 slots in that step's epoch."""

    step: int
    samples: tuple
    slots: tuple


class StepSampler:
    """The batches of global steps `start` to `stop - 1`: the batch sampler of the training DataLoader.

    Step s is global batch s % steps_per_epoch of epoch s // steps_per_epoch: the epoch order cut
    into global batches of `per_device` x `num_processes` samples, the last partial one dropped
    (the samples differ every epoch). Each global batch is yielded as `num_processes` consecutive
    blocks in rank order; accelerate hands process r every num_processes-th batch from the r-th, so
    process r trains block r of every step and the pool of the loss is rank-major. A resumed run
    starts the sampler at its step: the data position is the global step alone, and none of the
    steps before it is drawn or read.
    """

    drop_last = True  # tells accelerate that every batch is whole: nothing to pad or repeat

    def __init__(self, training_set: TrainingSet, seed: int, per_device: int, num_processes: int,
                 steps_per_epoch: int, start: int, stop: int):
        self.training_set, self.seed, self.per_device, self.num_processes = training_set, seed, per_device, num_processes
        self.steps_per_epoch, self.start, self.stop = steps_per_epoch, start, stop
        self.images_per_batch = per_device * len(SLOT_NAMES)  # at most; repeated images are read once

    def __len__(self) -> int:
        return (self.stop - self.start) * self.num_processes

    def __iter__(self):
        epoch, order = None, None
        for step in range(self.start, self.stop):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order = self.training_set.epoch_order(epoch, self.seed)
            first = step % self.steps_per_epoch * self.per_device * self.num_processes
            for rank in range(self.num_processes):
                samples = tuple(order[first + rank * self.per_device:first + (rank + 1) * self.per_device])
                slots = tuple(tuple(self.training_set.sample_slots(epoch, index, self.seed)) for index in samples)
                yield StepBatch(step, samples, slots)


def _generator(stream: int, seed: int, epoch: int, *sample_id: int) -> np.random.Generator:
    for name, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return np.random.default_rng(np.random.SeedSequence([stream, int(seed), int(epoch), *sample_id]))


def _draw(candidates: tuple, rng: np.random.Generator):
    """Key of one distractor drawn uniformly among `candidates`, or PAD when there is none."""
    if not candidates:
        return PAD
    return candidates[int(rng.integers(len(candidates)))][1]


def _sample_keys(sample: TrainingSample) -> list:
    """Every key a sample can show in some epoch."""
    views = [key for key in sample.views if key is not None]
    return views + [key for candidates in sample.distractors for _, key in candidates]


def _present(views: Sequence) -> int:
    return sum(key is not None for key in views)


# --------------------------------------------------------------------------------------------------
# Row subsets


def training_rows(num_rows: int, train: Sequence[int] | None = None,
                  held_out: Mapping[str, Sequence[int]] | None = None) -> list:
    """Rows to train on, checked so that no held-out row (val, test, ...) is ever trained on.

    `train` (e.g. `split_files.load_split_indices("splits/train.json")`) is checked to be disjoint
    from every held-out split; without it, training uses every row outside the held-out splits.
    `held_out` maps a split name to its row indices. Raises ValueError on overlaps or bad indices.
    """
    held_out = {name: check_indices(rows, num_rows, f"{name} split") for name, rows in (held_out or {}).items()}
    check_disjoint(held_out)
    if train is None:
        excluded = set().union(*held_out.values())
        rows = [row for row in range(num_rows) if row not in excluded]
        return check_indices(rows, num_rows, "training rows (all rows outside the held-out splits)")
    rows = check_indices(train, num_rows, "train split")
    check_disjoint({"train": rows, **held_out})
    return rows


# --------------------------------------------------------------------------------------------------
# Building


def build_training_set(benchmark, rows: Sequence[int] | None = None, mtg=None,
                       mtg_rows: Sequence[int] | None = None, mtg_repeats: int = 4,
                       skip_errors: bool = False) -> TrainingSet:
    """Index the images of the training rows and lay out the samples.

    `benchmark`: a `nearid_benchmark.NearIDBenchmark` (positives joined with the training distractor
    sources). `rows`: its rows to train on (default all; see `training_rows`). `mtg`: the MTG train
    split as a Dataset, or None; `mtg_rows` its rows (default all); `mtg_repeats`: samples per MTG
    row per epoch. Rows with fewer than 2 views are excluded (counted in `describe()`). An image file
    that cannot be read (a path-based dataset) is an error, or with `skip_errors` missing, and
    listed in `items.unreadable`.
    """
    if isinstance(mtg_repeats, bool) or not isinstance(mtg_repeats, int) or mtg_repeats < 0:
        raise ValueError(f"mtg_repeats must be a non-negative integer (samples per MTG row per epoch), "
                         f"got {mtg_repeats!r}")
    items = image_index.ImageIndex(skip_errors)
    rows = check_indices(range(len(benchmark)) if rows is None else rows, len(benchmark), "NearID training rows")
    nearid, nearid_excluded = _nearid_samples(benchmark, rows, items)
    mtg_samples, mtg_excluded = [], 0
    if isinstance(mtg, Mapping):  # a DatasetDict, or any mapping of split names to datasets
        raise ValueError(f"mtg is a mapping of splits {sorted(mtg)}, not one split; pass the train split, "
                         "e.g. mtg['train']")
    if mtg is not None:
        mtg_rows = check_indices(range(len(mtg)) if mtg_rows is None else mtg_rows, len(mtg), "MTG training rows")
        mtg_samples, mtg_excluded = _mtg_samples(mtg, mtg_rows, mtg_repeats, items)
    elif mtg_rows is not None:
        raise ValueError("mtg_rows was given without an MTG dataset; pass mtg=<MTG train split> too")
    samples = tuple(nearid + mtg_samples)
    if not samples:
        mtg_note = "no MTG dataset" if mtg is None else f"{mtg_excluded} MTG rows excluded, mtg_repeats={mtg_repeats}"
        raise ValueError(f"no training samples: {nearid_excluded} of {len(rows)} NearID rows have fewer than 2 "
                         f"views and MTG adds none ({mtg_note}); check the split files and the view columns")
    # Images seen only in excluded rows are no sample's business (and need no cache entry).
    items.retain({key for sample in samples for key in _sample_keys(sample)})
    if nearid_excluded or mtg_excluded:
        logger.warning("excluded from training (fewer than 2 views): %d NearID rows, %d MTG rows",
                       nearid_excluded, mtg_excluded)
    return TrainingSet(items, samples, tuple(benchmark.sources), {"nearid": nearid_excluded, "mtg": mtg_excluded},
                       mtg_repeats)


def _check_benchmark(benchmark) -> None:
    if not benchmark.sources:
        raise ValueError("the benchmark has no distractor sources; training needs at least one")
    readers.require_columns(benchmark.positives, benchmark.view_columns, "NearID positives")
    for name, source in benchmark.sources.items():
        if len(source) != len(benchmark.positives):
            raise ValueError(f"distractor source {name!r} has {len(source)} rows but the positives have "
                             f"{len(benchmark.positives)}; rows pair by index, so join them with "
                             "nearid.data.nearid_benchmark.join_sources (or open_benchmark), which checks lengths "
                             "and ids")
        readers.require_columns(source, benchmark.distractor_columns[name], f"distractor source {name!r}")


def _nearid_samples(benchmark, rows: list, items: image_index.ImageIndex) -> tuple:
    """(samples of the rows with >= 2 views, number of rows excluded)."""
    _check_benchmark(benchmark)
    views = [items.add_column("positives", benchmark.positives, column, rows) for column in benchmark.view_columns]
    views_by_row = list(zip(*views))
    kept = [i for i, row_views in enumerate(views_by_row) if _present(row_views) >= 2]
    kept_rows = [rows[i] for i in kept]
    # Distractors of excluded rows are never used, so they are not read.
    per_source = {name: [items.add_column(f"source {name}", source, column, kept_rows)
                         for column in benchmark.distractor_columns[name]]
                  for name, source in benchmark.sources.items()}
    samples = []
    for position, i in enumerate(kept):
        distractors = tuple(_scene_distractors(per_source, view, position) if key is not None else ()
                            for view, key in enumerate(views_by_row[i]))
        samples.append(TrainingSample("nearid", rows[i], 0, views_by_row[i], distractors))
    return samples, len(rows) - len(kept)


def _scene_distractors(per_source: dict, view: int, position: int) -> tuple:
    """((source, key), ...) of the sources that have a distractor in the scene of `view`."""
    return tuple((name, columns[view][position]) for name, columns in per_source.items()
                 if columns[view][position] is not None)


def _mtg_samples(mtg, rows: list, repeats: int, items: image_index.ImageIndex) -> tuple:
    """(mtg_repeats samples per row with both originals, number of rows excluded)."""
    readers.require_columns(mtg, MTG_VIEW_COLUMNS + MTG_NEGATIVE_COLUMNS, "MTG training dataset")
    originals = list(zip(*(items.add_column("MTG", mtg, column, rows) for column in MTG_VIEW_COLUMNS)))
    inpainted = list(zip(*(items.add_column("MTG", mtg, column, rows) for column in MTG_NEGATIVE_COLUMNS)))
    kept = [i for i, pair in enumerate(originals) if _present(pair) == 2]
    samples = []
    for repeat in range(repeats):
        for i in kept:
            distractors = tuple((("mtg", key),) if key is not None else () for key in inpainted[i]) + ((),)
            samples.append(TrainingSample("mtg", rows[i], repeat, originals[i] + (PAD,), distractors))
    return samples, len(rows) - len(kept)
