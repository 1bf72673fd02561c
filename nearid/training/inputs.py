"""What a training run reads: the training set, the held-out sets, and the head's input provider."""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass
from pathlib import Path

from nearid import tokens, training_data
from nearid.cli import DatasetSource, named_sources
from nearid.data import nearid_benchmark, readers, split_files
from nearid.evaluation import protocol
from nearid.images import PixelLoader
from nearid.store import fill as store_fill
from nearid.store.image_index import ImageIndex

# What a token store that does not fit on its disk can do instead (said before any token is computed).
DISK_OPTIONS = ("store int8 tokens (--cache-dtype int8, half of float16), train on fewer distractor sources "
                "(--source), or put --cache-dir on a larger disk")


@dataclass
class HeldOutSet:
    """Validation or test rows as image keys: views [3][rows] and distractors {source: [3][rows]}."""

    name: str
    views: list
    distractors: dict
    items: ImageIndex


def held_out_set(benchmark, rows, name, skip_errors):
    """Image keys of held-out rows, as the evaluation takes them; `where` in errors names the dataset row."""
    items = ImageIndex(skip_errors)
    views, distractors = protocol.nearid_keys(benchmark, items, rows, split=name)
    return HeldOutSet(name, views, distractors, items)


def read_splits(data_args, num_rows):
    """{split: row indices} from the split files; train defaults to every row not held out."""
    files = {"train": data_args.train_split, "val": data_args.val_split, "test": data_args.test_split}
    splits = {name: split_files.load_split_indices(path, num_rows) for name, path in files.items() if path}
    held_out = {name: rows for name, rows in splits.items() if name != "train"}
    # test rows are never trained on
    splits["train"] = training_data.training_rows(num_rows, splits.get("train"), held_out)
    return splits


def load_data(data_args):
    """The training set, held-out sets, dataset provenance and split sizes."""
    benchmark, provenance = nearid_benchmark.open_benchmark(DatasetSource.parse(data_args.positives),
                                                            named_sources(data_args.source))
    splits = read_splits(data_args, len(benchmark))
    mtg = None
    if data_args.mtg:
        mtg, provenance["mtg"] = readers.open_mtg(DatasetSource.parse(data_args.mtg), "train")
    training_set = training_data.build_training_set(benchmark, splits["train"], mtg=mtg,
                                                    mtg_repeats=data_args.mtg_repeats,
                                                    skip_errors=data_args.skip_bad_images)
    held_out = {name: held_out_set(benchmark, splits[name], name, data_args.skip_bad_images)
                for name in ("val", "test") if name in splits}
    return training_set, held_out, provenance, {name: len(rows) for name, rows in splits.items()}


def make_provider(model, processor, training_set, held_out, data_args, args, accelerator):
    """Token store (default) or the backbone every step; returns (provider, {where: reason} left out)."""
    # A chained view, not a copy: the indexes read image bytes only when looked up.
    indexes = [training_set.items, *(held.items for held in held_out.values())]
    items = ChainMap(*indexes)
    unreadable = {where: reason for index in indexes for where, reason in index.unreadable.items()}
    if not args.token_cache:
        loader = PixelLoader(processor)  # the token pass's loader, without an encoder's weight digest
        return tokens.BackboneEveryStep(model, items, loader, accelerator.device), unreadable
    keys = sorted(training_set.used_keys(range(args.num_epochs), args.seed)
                  | {k for held in held_out.values() for k in held.items})
    store, skipped = build_token_store(model, processor, tokens.TrainingImages(items, keys), args, data_args,
                                       accelerator)
    where = {key: next(index.where(key) for index in indexes if key in index) for key in skipped}
    if skipped:
        training_set.drop_images(set(skipped))
        for held in held_out.values():  # validation scores a skipped image as missing
            held.items.retain(set(held.items) - set(skipped))
        for key, reason in skipped.items():
            accelerator.print(f"skipped unreadable image {where[key]}: {reason}")
    return tokens.CachedTokens(store, accelerator.device), {**unreadable, **{where[k]: r for k, r in skipped.items()}}


def build_token_store(model, processor, images, args, data_args, accelerator):
    """Compute (or reuse) the backbone tokens of `images`; returns (store, skipped {key: reason}).

    The free disk space is checked against the store's size before anything is computed.
    """
    encoder = tokens.BackboneTokens(model, processor, args.cache_dtype, args.mixed_precision, accelerator.device,
                                    args.compile)
    root = Path(args.cache_dir or Path(args.output_dir) / "token_cache")
    options = store_fill.FillOptions(batch_size=args.batch_size, num_workers=args.num_workers,
                                     skip_errors=data_args.skip_bad_images, device=str(accelerator.device),
                                     progress=accelerator.is_main_process, description="caching backbone tokens",
                                     disk_options=DISK_OPTIONS)
    store, report = store_fill.fill(root, encoder.fingerprint, encoder.format, images, encoder.loader, encoder,
                                    options, accelerator.state)
    return store, report.skipped
