"""Train NearID's pooling head with the paper's recipe (docs/method.md sections 2 and 3) on cached
backbone tokens.

    python train.py --positives SRC --source flux=SRC [--source ...] [--mtg SRC]
        [--train-split F --val-split F --test-split F] --output-dir runs/nearid

SRC is a Hub dataset id (SRC@REVISION pins a revision), a `save_to_disk` folder or parquet. With
--positives Aleksandar/NearID, the paper's published splits are the defaults: training on the
18,786 rows outside them, validation on the val split, the test split evaluated once at the end. The
backbone is frozen and there is no augmentation, so each image's backbone tokens never change: they
are computed once (one batched no-grad pass over the images the run will use, kept in the
embed-once store under --cache-dir) and the epochs train the head on them. `--no-token-cache` runs
the backbone on all six slots at every step instead, as the reference implementation does (same
losses, far more compute).

Scale out with `accelerate launch --multi_gpu --num_processes N train.py ...` (on CPUs:
`torchrun --nproc_per_node N train.py ...`): --per-device-batch-size samples per process, positives
gathered across processes for the loss. Checkpoints land in OUTPUT_DIR/checkpoints (the newest
--checkpoints-total-limit kept, safetensors and JSON only); `--resume-from-checkpoint latest`
continues a run exactly. The trained model is exported to OUTPUT_DIR/release as a complete Hub repo
folder with its model card, and `--push-to-hub REPO_ID` uploads it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from collections import ChainMap
from dataclasses import dataclass, field
from pathlib import Path

from nearid import card, metrics, reports
from nearid.cli import (
    DatasetSource,
    NearIDSources,
    apply_published_splits,
    build_parser,
    lazy_module,
    named_sources,
    option,
    parse,
    save_arguments,
    user_errors,
)
from nearid.io import atomic_write_json, atomic_write_text
from nearid.numerics import PRECISIONS, resolve_precision

# torch, transformers and datasets come with these: loaded when the run first uses them, not for --help.
checkpoints, data, evaluation, models, embedding_store, tokens, training_data = (
    lazy_module(f"nearid.{name}")
    for name in ("checkpoints", "data", "evaluation", "models", "store", "tokens", "training_data"))

# What a token store that does not fit on its disk can do instead (said before any token is computed).
DISK_OPTIONS = ("store int8 tokens (--cache-dtype int8, half of float16), train on fewer distractor sources "
                "(--source), or put --cache-dir on a larger disk")
# Everything a previous run wrote into OUTPUT_DIR (the token store, reusable, is not among them).
RUN_OUTPUTS = ("checkpoints", "logs.jsonl", "train_results.json", "train_args.json", "release", "training_loss.png")


# --- arguments -------------------------------------------------------------------------------------


@dataclass
class DataArguments(NearIDSources):
    """Data"""

    mtg: str | None = option(None, "MTG dataset (abdo-eldesokey/mtg-dataset or a local copy); its train split is "
                                   "added")
    mtg_repeats: int = option(4, "how many times each MTG row appears per epoch (the reference's 4x weight)", min=0)
    train_split: str | None = option(None, "JSON list of positives rows to train on (default: every row not in "
                                           "the val or test split)")
    val_split: str | None = option(None, "JSON list of rows for periodic validation (SSR/PA); default: the "
                                         "published val split for Aleksandar/NearID, none for other positives")
    test_split: str | None = option(None, "JSON list of held-out rows: never trained on, evaluated once at the end; "
                                          "default: the published test split for Aleksandar/NearID, none for other "
                                          "positives")
    skip_bad_images: bool = option(False, "leave unreadable images out (counted and reported) instead of stopping")


@dataclass
class ModelArguments:
    """Model"""

    base_model: str = option("google/siglip2-so400m-patch14-384", "SigLIP checkpoint (Hub id or folder) whose "
                                                                  "tower and pretrained MAP head start the model, or "
                                                                  "a NearID model whose head goes on training")
    base_revision: str | None = option(None, "Hub revision (branch, tag or commit) of --base-model")


@dataclass
class TrainingArguments:
    """Training"""

    output_dir: str = option("runs/nearid", "checkpoints, logs, resolved arguments and the release folder",
                             folder=True)
    overwrite_output_dir: bool = option(False, "delete a previous run's outputs in --output-dir and start afresh")
    seed: int = option(0, "seeds the per-epoch data draws (anchor shuffle, distractor sources, order)", min=0)
    num_epochs: int = option(11, "training epochs", min=1)
    max_steps: int | None = option(None, "stop after this many steps (smoke runs); the schedule still spans "
                                         "--num-epochs", min=1)
    per_device_batch_size: int = option(128, "samples (6 image slots each) per process and step", min=1)
    learning_rate: float = option(1e-4, "AdamW peak learning rate", min=0.0)
    weight_decay: float = option(1e-4, "AdamW weight decay (all head parameters)", min=0.0)
    warmup_steps: int = option(100, "linear warmup steps before the cosine decay to 0 (the paper's 100 fit its "
                                    "~3,300 steps; scale it to short runs)", min=0)
    max_grad_norm: float = option(1.0, "gradient-norm clip", min=0.0)
    mixed_precision: str = option("auto", "autocast precision of the token pass and the head: auto is bf16 on a "
                                          "CUDA GPU and none elsewhere (the reference used fp16 on an A100)",
                                  choices=PRECISIONS)
    temperature: float = option(0.07, "softmax temperature T of both loss tiers", min=1e-6)
    alpha: float = option(0.5, "weight of Tier 2 (distractor above random negatives)", min=0.0)
    mask_padded: bool = option(False, "drop padded slots from the loss pool (off keeps them, as the reference does)")
    token_cache: bool = option(True, "train on cached backbone tokens; --no-token-cache runs the backbone on every "
                                     "slot at every step (the reference design)")
    cache_dir: str | None = option(None, "the embed-once store of backbone tokens (default OUTPUT_DIR/token_cache); "
                                         "reused by later runs with the same backbone and preprocessing",
                                  folder=True)
    cache_dtype: str = option("float16", "storage of cached tokens: float16 (1.68 MB per so400m image), int8 "
                                         "(half of that) or float32", choices=("float16", "int8", "float32"))
    batch_size: int = option(64, "images per backbone pass while building the token cache", min=1)
    num_workers: int = option(0, "DataLoader worker processes: they decode and preprocess images for the token pass, "
                                 "and read the cached tokens of the next steps while one trains (0: the main process "
                                 "reads, and the step waits)", min=0)
    compile: bool = option(False, "run the backbone of the token pass through torch.compile (GPU: faster once "
                                  "compiled; the first and the last, smaller batch compile)")
    log_steps: int = option(10, "print and log a compact line every N steps", min=1)
    validation_steps: int | None = option(None, "validate every N steps (default: at the end of each epoch)", min=1)
    checkpointing_steps: int | None = option(None, "save a checkpoint every N steps (default: each epoch end)",
                                             min=1)
    checkpoints_total_limit: int = option(3, "keep only the newest K checkpoints", min=1)
    resume_from_checkpoint: str | None = option(None, "continue from 'latest', a checkpoint folder, or step-N")
    report_to: str = option("jsonl", "accelerate trackers, comma separated (jsonl, tensorboard, wandb, ...) or none")
    export: bool = option(True, "write OUTPUT_DIR/release, a complete Hub repo folder with its model card")
    push_to_hub: str | None = option(None, "Hub repo id to upload the release folder to (one commit)")
    hub_private: bool = option(False, "create the Hub repo as private")
    hub_revision: str | None = option(None, "branch to push to (created if missing)")
    hub_commit_message: str | None = option(None, "commit message of the upload")


GROUPS = (DataArguments, ModelArguments, TrainingArguments)


def parse_arguments(argv=None) -> tuple:
    parser = build_parser("train.py", __doc__, groups=GROUPS)
    _, groups, debug = parse(parser, GROUPS, argv)
    return groups[DataArguments], groups[ModelArguments], groups[TrainingArguments], debug


def check_arguments(data_args, train_args) -> None:
    """What the parser cannot check, before anything expensive runs."""
    named_sources(data_args.source)  # bad syntax and repeated names
    if data_args.skip_bad_images and not train_args.token_cache:
        raise ValueError("--skip-bad-images needs the token cache (it finds bad images while building it); "
                         "drop --no-token-cache or fix the images")
    checkpoints.resolve(train_args.output_dir, train_args.resume_from_checkpoint)  # fails now, not after the cache
    check_push_possible(train_args)


def check_push_possible(args) -> None:
    """Before hours of training: a push needs the export and a token (the upload itself comes last)."""
    if not args.push_to_hub:
        return
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    if not args.export:
        raise ValueError("--push-to-hub uploads the release folder, so it needs --export")
    validate_repo_id(args.push_to_hub)
    if not get_token():
        raise ValueError("--push-to-hub needs a Hugging Face token with write access: log in with `hf auth login` "
                         "or set HF_TOKEN, then run again (nothing was trained yet).")


# --- data ------------------------------------------------------------------------------------------


@dataclass
class HeldOutSet:
    """Validation or test rows as image keys: views [3][rows] and distractors {source: [3][rows]}."""

    name: str
    views: list
    distractors: dict
    items: embedding_store.ImageIndex


def held_out_set(benchmark, rows, name, skip_errors):
    """Image keys of held-out rows; `where` in errors names the original dataset row."""
    items = embedding_store.ImageIndex(skip_errors)
    views = [items.add_column(f"positives ({name} split)", benchmark.positives, c, rows)
             for c in benchmark.view_columns]
    distractors = {source: [items.add_column(f"source {source} ({name} split)", benchmark.sources[source], c, rows)
                            for c in columns]
                   for source, columns in benchmark.distractor_columns.items()}
    return HeldOutSet(name, views, distractors, items)


def read_splits(data_args, num_rows):
    """{split: row indices} from the split files; train defaults to every row not held out."""
    files = {"train": data_args.train_split, "val": data_args.val_split, "test": data_args.test_split}
    splits = {name: data.load_split_indices(path, num_rows) for name, path in files.items() if path}
    held_out = {name: rows for name, rows in splits.items() if name != "train"}
    # test rows are never trained on
    splits["train"] = training_data.training_rows(num_rows, splits.get("train"), held_out)
    return splits


def load_data(data_args):
    """The training set, held-out sets, dataset provenance and split sizes."""
    benchmark, provenance = data.open_benchmark(DatasetSource.parse(data_args.positives),
                                                named_sources(data_args.source))
    splits = read_splits(data_args, len(benchmark))
    mtg = None
    if data_args.mtg:
        mtg, provenance["mtg"] = data.open_mtg(DatasetSource.parse(data_args.mtg), "train")
    training_set = training_data.build_training_set(benchmark, splits["train"], mtg=mtg,
                                                    mtg_repeats=data_args.mtg_repeats,
                                                    skip_errors=data_args.skip_bad_images)
    held_out = {name: held_out_set(benchmark, splits[name], name, data_args.skip_bad_images)
                for name in ("val", "test") if name in splits}
    return training_set, held_out, provenance, {name: len(rows) for name, rows in splits.items()}


# --- head inputs -----------------------------------------------------------------------------------


def make_provider(model, processor, training_set, held_out, data_args, args, accelerator):
    """Token store (default) or the backbone every step; returns (provider, {where: reason} left out)."""
    # A chained view, not a copy: the indexes read image bytes only when looked up.
    indexes = [training_set.items, *(held.items for held in held_out.values())]
    items = ChainMap(*indexes)
    unreadable = {where: reason for index in indexes for where, reason in index.unreadable.items()}
    if not args.token_cache:
        loader = tokens.BackboneTokens(model, processor).loader
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
    options = embedding_store.FillOptions(batch_size=args.batch_size, num_workers=args.num_workers,
                                          skip_errors=data_args.skip_bad_images, device=str(accelerator.device),
                                          progress=accelerator.is_main_process, description="caching backbone tokens",
                                          disk_options=DISK_OPTIONS)
    store, report = embedding_store.fill(root / encoder.fingerprint, encoder.fingerprint, encoder.format, images,
                                         encoder.loader, encoder, options, accelerator.state)
    return store, report.skipped


# --- the training loop -----------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop touches, in one place."""

    args: TrainingArguments
    accelerator: object
    model: object
    head: object  # the prepared (possibly DDP-wrapped) pooling head
    optimizer: object
    scheduler: object
    provider: object
    training_set: object
    held_out: dict
    run_key: dict
    steps_per_epoch: int
    total_steps: int
    global_step: int = 0
    history: dict = field(default_factory=lambda: {"validation": [], "loss": []})


def nearid_loss(*args, **kwargs):
    """`nearid.loss.nearid_loss`, imported with torch when the first step runs."""
    from nearid.loss import nearid_loss as loss_function

    return loss_function(*args, **kwargs)


def train_step(run, epoch, batch):
    """One optimisation step on this process's batch (`TokenBatches`); returns the loss output (global values)."""
    import torch

    with run.accelerator.autocast():
        embeddings = tokens.batch_embeddings(run.head, run.provider, batch)
        loss = nearid_loss(embeddings, batch["mask"], run.args.temperature, run.args.alpha, run.args.mask_padded)
    if not torch.isfinite(loss.total):
        samples = batch["samples"].tolist()
        raise FloatingPointError(
            f"non-finite loss ({loss.total.item()}) at step {run.global_step + 1} (epoch {epoch}, samples "
            f"{list(samples)[:8]}{'...' if len(samples) > 8 else ''} of this process); stopped before the update, "
            f"no checkpoint was written for it. Try --mixed-precision no or a lower --learning-rate, and resume "
            "from the last checkpoint with --resume-from-checkpoint latest.")
    run.accelerator.backward(loss.loss)
    if run.accelerator.sync_gradients:
        run.accelerator.clip_grad_norm_(run.head.parameters(), run.args.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss


def held_out_scores(held, embeddings):
    """SSR/PA per source and pooled over the given sources, with the evaluation's metric functions."""
    dim = len(next(iter(embeddings.values())))
    margins = evaluation.nearid_margins_by_source(embeddings, held.views, held.distractors, dim)
    per_source = {source: metrics.nearid_scores(*m) for source, m in margins.items()}
    return {"per_source": per_source, "pooled": metrics.nearid_pooled_scores(margins, sources=list(margins))}


def validate(run, name="val"):
    """SSR/PA of the current head on a held-out split (main process); logged and kept in the history."""
    held = run.held_out.get(name)
    if held is None or not run.accelerator.is_main_process:
        run.accelerator.wait_for_everyone()
        return None
    head = run.accelerator.unwrap_model(run.head).eval()
    scores = held_out_scores(held, tokens.embed_keys(head, run.provider, list(held.items)))
    head.train()
    pooled = scores["pooled"]
    run.accelerator.log({f"{name}/ssr": pooled["ssr"], f"{name}/pa": pooled["pa"]}, step=run.global_step)
    run.accelerator.print(f"step {run.global_step}: {name} SSR {pooled['ssr']:.2f} PA {pooled['pa']:.2f} "
                          f"({pooled['n_samples']} samples)")
    run.history["validation"].append({"step": run.global_step, "split": name, **scores})
    run.accelerator.wait_for_everyone()
    return scores


def log_interval(run, loss, started, epoch):
    seconds = time.perf_counter() - started
    values = {"loss": loss.total.item(), "tier1": loss.tier1.item(), "tier2": loss.tier2.item(),
              "lr": run.scheduler.get_last_lr()[0], "epoch": epoch}
    run.accelerator.log(values, step=run.global_step)
    run.history["loss"].append([run.global_step, values["loss"]])
    run.accelerator.print(f"step {run.global_step}/{run.total_steps} epoch {epoch} loss {values['loss']:.4f} "
                          f"(tier1 {values['tier1']:.4f} tier2 {values['tier2']:.4f}) lr {values['lr']:.2e} "
                          f"{seconds:.0f}s")


def after_step(run, loss, started, epoch, end_of_epoch):
    args = run.args
    if run.global_step % args.log_steps == 0 or run.global_step == run.total_steps:
        log_interval(run, loss, started, epoch)
    at = lambda every: (run.global_step % every == 0) if every else end_of_epoch  # noqa: E731
    if at(args.validation_steps):
        validate(run)
    if at(args.checkpointing_steps):
        save_checkpoint(run)


def training_loader(run, last_step):
    """The head's input for steps run.global_step to last_step: a DataLoader that accelerate prepares.

    Its sampler yields every global step's batches in rank order and accelerate gives each process
    its own (`StepSampler`); worker processes (--num-workers) read the tokens of the next steps while
    one trains, and accelerate copies each batch to the device without blocking. The loader starts
    at the current step, so a resumed run reads none of the batches before it.
    """
    args, accelerator = run.args, run.accelerator
    sampler = training_data.StepSampler(run.training_set, args.seed, args.per_device_batch_size,
                                        accelerator.num_processes, run.steps_per_epoch, run.global_step, last_step)
    loader = tokens.token_loader(run.provider, sampler, args.num_workers, accelerator.device)
    return accelerator.prepare_data_loader(loader, device_placement=True)


def train(run, last_step):
    """Steps from run.global_step to last_step; the data position is the global step alone (`StepSampler`)."""
    from tqdm.auto import tqdm

    loader = training_loader(run, last_step)
    started = time.perf_counter()
    bar = tqdm(total=last_step, initial=run.global_step, desc="training", unit="step",
               disable=not run.accelerator.is_local_main_process)
    run.head.train()
    for batch in loader:
        epoch, step = divmod(run.global_step, run.steps_per_epoch)
        loss = train_step(run, epoch, batch)
        run.global_step += 1
        bar.update(1)
        after_step(run, loss, started, epoch, end_of_epoch=step == run.steps_per_epoch - 1)
    bar.close()


# --- checkpoints -----------------------------------------------------------------------------------


def save_checkpoint(run):
    """Head, optimizer, schedule, loss scaler, data position and history (main process; others wait)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder = Path(run.args.output_dir) / "checkpoints" / f"{checkpoints.PREFIX}{run.global_step:07d}"
        # The data position is the global step alone: every draw follows from (seed, epoch, sample),
        # and the resumed run's loader starts at that step (`StepSampler`).
        position = {"global_step": run.global_step, "run": run.run_key, "history": run.history}
        checkpoints.save(folder, accelerator.unwrap_model(run.head), run.optimizer.optimizer, run.scheduler,
                         accelerator.scaler, position, run.args.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def resume(run):
    """Load the requested checkpoint into the run; returns the global step to continue from."""
    path = checkpoints.resolve(run.args.output_dir, run.args.resume_from_checkpoint)
    if path is None:
        return 0
    position = checkpoints.load(path, run.accelerator.unwrap_model(run.head), run.optimizer.optimizer,
                                run.scheduler, run.accelerator.scaler)
    run.history = position["history"]  # its settings were checked before the data was read (`check_resume`)
    if run.accelerator.is_main_process:
        trim_log(Path(run.args.output_dir) / "logs.jsonl", position["global_step"])
    run.accelerator.print(f"resumed from {path} at step {position['global_step']}")
    return position["global_step"]


# Every argument that changes the trained weights: a resumed run must keep each one. Left out are where
# things go (--output-dir, --cache-dir), when the run stops, logs, validates or saves (--max-steps,
# --log-steps, --validation-steps, --checkpointing-*), speed alone (--batch-size and --num-workers change no
# value; --compile changes values only within rounding, as the token store's fingerprint says), publishing
# (--export, --push-to-hub, --hub-*), and --skip-bad-images (a run with unreadable images stops before
# its first checkpoint without it).
RESUME_KEY = {
    TrainingArguments: ("seed", "num_epochs", "per_device_batch_size", "learning_rate", "weight_decay",
                        "warmup_steps", "max_grad_norm", "mixed_precision", "temperature", "alpha", "mask_padded",
                        "token_cache", "cache_dtype"),
    ModelArguments: ("base_model", "base_revision"),
    DataArguments: ("positives", "source", "mtg", "mtg_repeats", "train_split", "val_split", "test_split"),
}


def resume_key(data_args, model_args, train_args, num_processes):
    """The settings a resumed run must share with the checkpoint (`RESUME_KEY`), and the process count (the
    global batch and the data order follow from it)."""
    key = {name: getattr(args, name) for args in (train_args, model_args, data_args)
           for name in RESUME_KEY[type(args)]}
    return {**key, "num_processes": num_processes}


def check_resume_settings(path, position, key):
    """Refuse to resume with settings other than the checkpoint's, naming each with both values.

    A setting the checkpoint does not record (it was written before the setting joined the key) is not
    compared, and is said."""
    recorded = position["run"]
    differ = [f"{_flag(name)} is {recorded[name]!r} in the checkpoint and {value!r} now"
              for name, value in key.items() if name in recorded and recorded[name] != value]
    if differ:
        raise ValueError(f"cannot resume from {path}: {'; '.join(differ)}. These change the result, so a resumed "
                         "run must keep the checkpoint's values: pass them, or start a new --output-dir.")
    unrecorded = [_flag(name) for name in key if name not in recorded]
    if unrecorded:
        print(f"warning: {path} does not record {', '.join(unrecorded)} (written by an earlier version); these are "
              "taken as given now, unchecked.", file=sys.stderr)


def _flag(name):
    return "the number of processes" if name == "num_processes" else f"--{name.replace('_', '-')}"


def check_resume(args, key):
    """Before the data and the token pass: the checkpoint to resume is intact and was made with these settings."""
    path = checkpoints.resolve(args.output_dir, args.resume_from_checkpoint)
    if path is not None:
        checkpoints.check_intact(path)
        check_resume_settings(path, checkpoints.read_position(path), key)


def trim_log(path, step):
    """Keep only the log lines of steps up to `step` (and the runs' configuration lines, which have none), so
    the steps a resumed run trains again are logged once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _is_logged_up_to(line, step)]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _is_logged_up_to(line, step):
    try:
        logged = json.loads(line).get("step")
    except ValueError:
        return False  # a line cut short by a kill
    return logged is None or logged <= step


def prepare_output_dir(args, accelerator):
    """Never mix runs: a run with work to lose (checkpoints, results, a release) is resumed, or removed with
    --overwrite-output-dir; a fresh start removes every earlier output before it writes its own."""
    out = Path(args.output_dir)
    present = [name for name in RUN_OUTPUTS if (out / name).exists()]
    work = [name for name in present if name in ("checkpoints", "train_results.json", "release")]
    if work and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise FileExistsError(f"{out} already holds a training run ({', '.join(work)}). Continue it with "
                              "--resume-from-checkpoint latest, choose another --output-dir, or pass "
                              "--overwrite-output-dir to start afresh.")
    if accelerator.is_main_process and not args.resume_from_checkpoint:
        # All of the old run goes before the new one writes anything, so a crash can never leave old
        # results beside the new run's files (the reusable token store stays).
        for name in present:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


# --- setting up, finishing -------------------------------------------------------------------------


def make_accelerator(args):
    from accelerate import Accelerator, DataLoaderConfiguration

    trackers = [t for t in args.report_to.split(",") if t and t != "none"]
    log_with = [jsonl_tracker(Path(args.output_dir) / "logs.jsonl") if t == "jsonl" else t for t in trackers]
    # Without an accelerator device, accelerate joins the processes of a launch (torchrun, gloo) only
    # when told to use the CPU; otherwise every process would train alone on the whole data.
    # non_blocking: batches from pinned memory are copied to the GPU while the host goes on.
    return Accelerator(mixed_precision=args.mixed_precision, log_with=log_with or None, cpu=not has_accelerator(),
                       dataloader_config=DataLoaderConfiguration(non_blocking=True))


def has_accelerator():
    import torch

    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, MPS, XPU, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def jsonl_tracker(path):
    """An accelerate tracker that appends one JSON object per log call: readable without any service."""
    from accelerate.tracking import GeneralTracker

    class JsonlTracker(GeneralTracker):
        name, requires_logging_directory = "jsonl", False

        def __init__(self):
            super().__init__()
            self.path = Path(path)

        @property
        def tracker(self):
            return self.path

        def store_init_configuration(self, values):
            self.log({"config": values})

        def log(self, values, step=None, **kwargs):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as stream:
                stream.write(json.dumps({"step": step, **values}, default=str) + "\n")

    return JsonlTracker()


def make_run(data_args, model_args, args, accelerator, training_set, held_out, provider, model):
    import torch
    from transformers import get_cosine_schedule_with_warmup

    global_batch = args.per_device_batch_size * accelerator.num_processes
    steps_per_epoch = len(training_set) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(training_set)} samples per epoch, fewer than one global batch "
                         f"({args.per_device_batch_size} x {accelerator.num_processes} processes); lower "
                         "--per-device-batch-size or add data")
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=args.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    total_steps = steps_per_epoch * args.num_epochs
    warn_long_warmup(args, total_steps, accelerator)
    # Stepped once per optimisation step by the loop itself (not prepared: accelerate would step it
    # once per process), so the schedule is the same for any number of processes.
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)
    head, optimizer = accelerator.prepare(model.head, optimizer)
    key = resume_key(data_args, model_args, args, accelerator.num_processes)
    return Run(args, accelerator, model, head, optimizer, scheduler, provider, training_set, held_out, key,
               steps_per_epoch, total_steps)


def warn_long_warmup(args, total_steps, accelerator):
    steps = min(total_steps, args.max_steps or total_steps)
    if args.warmup_steps > 0.25 * steps:
        accelerator.print(f"warning: --warmup-steps {args.warmup_steps} covers {min(args.warmup_steps, steps)} of the "
                          f"{steps} steps this run trains ({100 * min(1.0, args.warmup_steps / steps):.0f}%): the "
                          "learning rate is still rising for most of the run. The paper's 100 warmup steps fit "
                          "~3,300 steps; use a few percent of yours.")


def export(run, processor, model_args, all_args, final, provenance):
    """The release folder: a complete Hub repo with its model card; returns (folder, what the card lacks).

    provenance: {"positives": ..., <source>: ..., "mtg": ...} as `load_data` recorded them; the card
    names a dataset by Hub id only when it was read from the Hub at a recorded revision.
    """
    from nearid.hub import export_hub_folder

    args = run.args
    split, scores = final if final else (None, None)
    evaluated = [p for name, p in provenance.items() if name != "mtg"]  # the final evaluation's data
    results = card.benchmark_results("nearid", scores["pooled"], split, evaluated) if scores else None
    model_card = {"repo_id": args.push_to_hub, "base_model": model_args.base_model,
                  "datasets": list(provenance.values()), "training_args": all_args, "results": results,
                  "model_name": args.push_to_hub or f"nearid-{Path(args.output_dir).resolve().name}"}
    lacks = card.card_warnings(model_args.base_model, model_card["datasets"], results)
    with warnings.catch_warnings():  # said once below, in this program's own words
        warnings.simplefilter("ignore", card.CardWarning)
        folder = export_hub_folder(run.model, processor, Path(args.output_dir) / "release", overwrite=True,
                                   model_card=model_card)
    print(f"exported {folder}")
    for lack in lacks:
        print(f"warning: model card: {lack}", file=sys.stderr)
    return folder, lacks


def push(args, folder):
    """Upload the release folder in one commit; a failure leaves it intact and says how to retry."""
    from nearid.hub import push_to_hub

    url = push_to_hub(folder, args.push_to_hub, private=args.hub_private, revision=args.hub_revision,
                      commit_message=args.hub_commit_message or "Upload NearID trained with train.py")
    print(f"pushed to {url}")
    return url


def finish(run, processor, data_args, model_args, all_args, skipped, describe):
    """Final held-out evaluation (test if given, else val), export, loss plot, results file, then the push."""
    final_split = "test" if "test" in run.held_out else ("val" if "val" in run.held_out else None)
    scores = validate(run, final_split) if final_split else None
    if not run.accelerator.is_main_process:
        return None
    out = Path(run.args.output_dir)
    results = {"global_step": run.global_step, "final_split": final_split, "final": scores,
               "history": run.history["validation"], "loss": run.history["loss"], "skipped_images": skipped,
               "data": describe, "arguments": all_args, "warnings": []}
    folder = None
    if run.args.export:
        folder, lacks = export(run, processor, model_args, all_args, (final_split, scores) if scores else None,
                               describe["datasets"])
        results["warnings"] += [f"model card: {lack}" for lack in lacks]
    results["release"] = str(folder) if folder else None
    try:
        reports.plot_training_loss(out / "training_loss.png", run.history, model_args.base_model)
    except Exception as error:  # a plot must never cost the results
        results["warnings"].append(f"plotting training_loss.png failed ({type(error).__name__}: {error})")
        print(f"warning: {results['warnings'][-1]}", file=sys.stderr)
    atomic_write_json(out / "train_results.json", results)  # written before the upload: a failed push loses nothing
    if run.args.push_to_hub:
        results["pushed"] = push(run.args, folder)
        atomic_write_json(out / "train_results.json", results)
    return results


def main(argv=None):
    data_args, model_args, args, debug = parse_arguments(argv)
    hint = ("Pass --skip-bad-images to train without unreadable images; they are counted and listed in "
            "train_results.json.")
    with user_errors(debug, {"image_processing_nearid.ImageLoadError": hint}):
        return run_training(data_args, model_args, args)


def run_training(data_args, model_args, args):
    check_arguments(data_args, args)
    split_notes = apply_published_splits([data_args], data_args.positives, {"val_split": "val", "test_split": "test"})
    # Resolved before anything records it: "auto" is bf16 on a CUDA GPU, none elsewhere.
    args.mixed_precision = resolve_precision(args.mixed_precision, "auto")
    accelerator = make_accelerator(args)
    for note in split_notes:
        accelerator.print(note)
    out = prepare_output_dir(args, accelerator)
    all_args = {**vars(data_args), **vars(model_args), **vars(args), "num_processes": accelerator.num_processes}
    check_resume(args, resume_key(data_args, model_args, args, accelerator.num_processes))
    if accelerator.is_main_process:
        save_arguments(out / "train_args.json", "train.py", data_args, model_args, args)
    accelerator.init_trackers("nearid", config={k: str(v) for k, v in all_args.items()})
    training_set, held_out, provenance, split_sizes = load_data(data_args)
    accelerator.print(f"training data: {json.dumps(training_set.describe(), default=str)}")
    model, processor = models.nearid_from_siglip(model_args.base_model, model_args.base_revision)
    model.to(accelerator.device)
    provider, skipped = make_provider(model, processor, training_set, held_out, data_args, args, accelerator)
    describe = {**training_set.describe(), "splits": split_sizes, "datasets": provenance}  # counts skipped images
    run = make_run(data_args, model_args, args, accelerator, training_set, held_out, provider, model)
    run.global_step = resume(run)
    last_step = min(run.total_steps, args.max_steps or run.total_steps)
    train(run, last_step)
    saved = checkpoints.completed(out)
    if not saved or saved[-1].name != f"{checkpoints.PREFIX}{run.global_step:07d}":
        save_checkpoint(run)
    results = finish(run, processor, data_args, model_args, all_args, skipped, describe)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
