"""Train NearID's pooling head with the paper's recipe (SPEC sections 2 and 3), on cached backbone tokens.

    python train.py --positives SRC --source flux=SRC [--source ...] [--mtg SRC] \
        [--train_split F --val_split F --test_split F] --output_dir runs/nearid

SRC is a Hub dataset id, a `save_to_disk` folder or parquet. The backbone is frozen and there is no
augmentation, so each image's backbone tokens never change: they are computed once (one batched
no-grad pass over the images the run will use, stored memory-mapped under --token_cache_dir) and the
epochs train the head on them. `--token_cache false` runs the backbone on all six slots at every
step instead, as the reference implementation does (same losses, far more compute).

Scale out with `accelerate launch --multi_gpu --num_processes N train.py ...` (on CPUs:
`torchrun --nproc_per_node N train.py ...`): --per_device_batch_size samples per process,
positives gathered across processes for the loss. Checkpoints land in OUTPUT_DIR/checkpoints (the
last --checkpoints_total_limit kept); `--resume_from_checkpoint latest` continues a run exactly. The
trained model is exported to OUTPUT_DIR/release as a complete Hub repo folder with its model card,
and `--push_to_hub REPO_ID` uploads it.
"""

import hashlib
import json
import os
import shutil
import sys
import time
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from nearid import data
from nearid import metrics
from nearid.embedding import slot_embeddings
from nearid.loss import nearid_loss
from nearid.models import nearid_from_siglip
from nearid.token_cache import TokenCache
from nearid.training_data import ImageIndex, build_training_set, slot_mask, training_rows

PAD_KEY = "pad"  # the token-cache key of a padded slot: an all-zero pixel tensor, as in the reference
CHECKPOINT_PREFIX = "step-"


# --- arguments -------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    positives: str = field(metadata={"help": "positives dataset: Hub id (Aleksandar/NearID), save_to_disk folder or parquet"})
    source: list[str] = field(default_factory=list, metadata={
        "action": "extend", "help": "training distractor source NAME=SRC, e.g. flux=Aleksandar/NearID-Flux; repeat for several"})
    mtg: Optional[str] = field(default=None, metadata={"help": "MTG dataset (abdo-eldesokey/mtg-dataset or a local copy); its train split is added"})
    mtg_repeats: int = field(default=4, metadata={"help": "how many times each MTG row appears per epoch (the reference's 4x weight)"})
    train_split: Optional[str] = field(default=None, metadata={"help": "JSON list of positives rows to train on (default: every row not in val/test)"})
    val_split: Optional[str] = field(default=None, metadata={"help": "JSON list of rows for periodic validation (SSR/PA)"})
    test_split: Optional[str] = field(default=None, metadata={"help": "JSON list of held-out rows: never trained on; evaluated once at the end"})
    skip_bad_images: bool = field(default=False, metadata={"help": "leave unreadable images out (counted and reported) instead of stopping"})


@dataclass
class ModelArguments:
    base_model: str = field(default="google/siglip2-so400m-patch14-384", metadata={
        "help": "SigLIP checkpoint (Hub id or folder) whose tower and pretrained MAP head start the model"})
    base_revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of --base_model"})


@dataclass
class TrainingArguments:
    output_dir: str = field(default="runs/nearid", metadata={"help": "checkpoints, logs, resolved arguments and the release folder"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start afresh even if --output_dir holds a previous run"})
    seed: int = field(default=0, metadata={"help": "seeds the per-epoch data draws (anchor shuffle, distractor sources, order)"})
    num_epochs: int = field(default=11, metadata={"help": "training epochs"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after this many steps (smoke runs); the schedule still spans --num_epochs"})
    per_device_batch_size: int = field(default=128, metadata={"help": "samples (6 image slots each) per process and step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (all head parameters)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps before the cosine decay to 0"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (the reference used fp16 on an A100)"})
    temperature: float = field(default=0.07, metadata={"help": "softmax temperature T of both loss tiers"})
    alpha: float = field(default=0.5, metadata={"help": "weight of Tier 2 (distractor above random negatives)"})
    mask_padded: bool = field(default=False, metadata={"help": "drop padded slots from the loss pool (default keeps them, as the reference does)"})
    token_cache: bool = field(default=True, metadata={"help": "train on cached backbone tokens; false runs the backbone every step (reference design)"})
    token_cache_dir: Optional[str] = field(default=None, metadata={"help": "token cache folder (default OUTPUT_DIR/token_cache); reusable across runs"})
    token_cache_dtype: str = field(default="float16", metadata={"help": "float16, int8 or float32 storage of cached tokens"})
    embed_batch_size: int = field(default=64, metadata={"help": "images per backbone pass while building the token cache"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes for decoding images"})
    log_steps: int = field(default=10, metadata={"help": "print and log a compact line every N steps"})
    validation_steps: Optional[int] = field(default=None, metadata={"help": "validate every N steps (default: at the end of each epoch)"})
    checkpointing_steps: Optional[int] = field(default=None, metadata={"help": "save a checkpoint every N steps (default: each epoch end)"})
    checkpoints_total_limit: int = field(default=3, metadata={"help": "keep only the newest K checkpoints"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "'latest' or a checkpoint folder to continue from"})
    report_to: str = field(default="jsonl", metadata={"help": "accelerate trackers, comma separated (jsonl, tensorboard, wandb, ...) or none"})
    export: bool = field(default=True, metadata={"help": "write OUTPUT_DIR/release, a complete Hub repo folder with model card"})
    push_to_hub: Optional[str] = field(default=None, metadata={"help": "Hub repo id to upload the release folder to (one commit)"})
    hub_private: bool = field(default=False, metadata={"help": "create the Hub repo as private"})
    hub_revision: Optional[str] = field(default=None, metadata={"help": "branch to push to (created if missing)"})
    hub_commit_message: Optional[str] = field(default=None, metadata={"help": "commit message of the upload"})


def parse_arguments(argv=None):
    from transformers import HfArgumentParser

    parser = HfArgumentParser((DataArguments, ModelArguments, TrainingArguments), description=__doc__)
    data_args, model_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    check_arguments(data_args, train_args)
    return data_args, model_args, train_args


def check_arguments(data_args, train_args):
    if not data_args.source:
        raise SystemExit("at least one --source NAME=SRC is needed (the distractor datasets to train with)")
    for text in data_args.source:
        name, sep, location = text.partition("=")
        if not (sep and name and location):
            raise SystemExit(f"--source expects NAME=SRC (e.g. flux=Aleksandar/NearID-Flux), got {text!r}")
    if train_args.mixed_precision not in ("no", "fp16", "bf16"):
        raise SystemExit(f"--mixed_precision must be no, fp16 or bf16, got {train_args.mixed_precision!r}")
    if train_args.token_cache_dtype not in ("float16", "int8", "float32"):
        raise SystemExit(f"--token_cache_dtype must be float16, int8 or float32, got {train_args.token_cache_dtype!r}")
    if data_args.skip_bad_images and not train_args.token_cache:
        raise SystemExit("--skip_bad_images needs the token cache (it finds bad images while building it); "
                         "drop --token_cache false or fix the images")
    for name in ("per_device_batch_size", "num_epochs", "log_steps", "checkpoints_total_limit"):
        if getattr(train_args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(train_args, name)}")


# --- data ------------------------------------------------------------------------------------------


@dataclass
class HeldOutSet:
    """Validation or test rows as image keys: views [3][rows] and distractors {source: [3][rows]}."""

    name: str
    views: list
    distractors: dict
    items: dict


def held_out_set(benchmark, rows, name):
    """Image keys of held-out rows; `where` in errors names the original dataset row."""
    items = ImageIndex()
    views = [items.add_column(f"positives ({name} split)", benchmark.positives, c, rows) for c in benchmark.view_columns]
    distractors = {source: [items.add_column(f"source {source} ({name} split)", benchmark.sources[source], c, rows)
                            for c in columns]
                   for source, columns in benchmark.distractor_columns.items()}
    return HeldOutSet(name, views, distractors, items)


def read_splits(data_args, num_rows):
    """{split: row indices} from the split files; train defaults to every row not held out."""
    files = {"train": data_args.train_split, "val": data_args.val_split, "test": data_args.test_split}
    splits = {name: data.load_split_indices(path, num_rows) for name, path in files.items() if path}
    held_out = {name: rows for name, rows in splits.items() if name != "train"}
    splits["train"] = training_rows(num_rows, splits.get("train"), held_out)  # test rows are never trained on
    return splits


def load_data(data_args):
    """The training set, held-out sets and dataset provenance."""
    sources = dict(text.split("=", 1) for text in data_args.source)
    benchmark, provenance = data.open_benchmark(data_args.positives, sources)
    splits = read_splits(data_args, len(benchmark))
    mtg = None
    if data_args.mtg:
        mtg, provenance["mtg"] = data.open_mtg(data_args.mtg, "train")
    training_set = build_training_set(benchmark, splits["train"], mtg=mtg, mtg_repeats=data_args.mtg_repeats)
    held_out = {name: held_out_set(benchmark, splits[name], name) for name in ("val", "test") if name in splits}
    return training_set, held_out, provenance, {name: len(rows) for name, rows in splits.items()}


# --- model and backbone tokens ---------------------------------------------------------------------


class PixelLoader:
    """(encoded ref, where) -> pixel tensor [3, H, W]; None (a padded slot) -> zeros, as in the reference."""

    def __init__(self, processor):
        self.processor = processor
        self.shape = (3, processor.size["height"], processor.size["width"])

    def __call__(self, item):
        if item is None:
            return torch.zeros(self.shape)
        ref, where = item
        image = data.decode_image(ref, where).convert("RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def backbone_fingerprint(model, processor, storage_dtype, mixed_precision):
    """Cached tokens depend on the backbone weights, the preprocessing and the numeric formats only."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith("backbone.vision_model.head."):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(processor.to_json_string().encode())
    digest.update(f"{storage_dtype}|{mixed_precision}".encode())
    return digest.hexdigest()[:32]


class CachedTokens:
    """Head inputs from the token cache; each unique image of a batch is read once (pads cost nothing)."""

    def __init__(self, cache, device):
        self.cache, self.device = cache, device

    def tokens(self, keys):
        keys = [PAD_KEY if k is None else k for k in keys]
        position = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        tokens = self.cache.get(list(position), device=self.device)
        return tokens, torch.tensor([position[k] for k in keys], device=self.device)


class BackboneEveryStep:
    """Head inputs from running the frozen backbone on every slot of every sample (the reference design)."""

    def __init__(self, model, items, loader, device):
        self.model, self.items, self.loader, self.device = model, items, loader, device

    def tokens(self, keys):
        pixels = torch.stack([self.loader(None if k is None else self.items[k]) for k in keys]).to(self.device)
        with torch.no_grad():
            return self.model.forward_features(pixels), torch.arange(len(keys), device=self.device)


class CacheItems(Mapping):
    """The images to cache, read lazily from the training and held-out indexes, plus the padding item."""

    def __init__(self, items, keys):
        self.items, self.keys = items, [PAD_KEY, *keys]

    def __getitem__(self, key):
        return None if key == PAD_KEY else self.items[key]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


def build_token_cache(model, processor, keys, items, args, skip_errors, accelerator):
    """Compute (or reuse) the backbone tokens of `keys`; returns (TokenCache, skipped {key: reason}).

    The cache checks the free disk space against its size estimate before computing anything.
    """
    folder = Path(args.token_cache_dir or Path(args.output_dir) / "token_cache")
    autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    fingerprint = backbone_fingerprint(model, processor, args.token_cache_dtype, args.mixed_precision)
    try:
        return TokenCache.build(folder, model, CacheItems(items, keys), PixelLoader(processor), fingerprint,
                                dtype=args.token_cache_dtype, batch_size=args.embed_batch_size,
                                num_workers=args.num_workers, skip_errors=skip_errors, device=accelerator.device,
                                autocast_dtype=autocast, state=accelerator.state,
                                progress=accelerator.is_main_process)
    except ValueError as error:
        if isinstance(error.__cause__, data.ImageReadError):  # point to this script's option, not the cache's
            raise data.ImageReadError(f"{error.__cause__}, or pass --skip_bad_images true to train without "
                                      "that image") from error
        raise


def head_embeddings(head, provider, keys):
    """Image keys (None = pad) -> L2-normalised head embeddings [len(keys), D], in key order."""
    tokens, index = provider.tokens(keys)
    return F.normalize(head(tokens).float(), dim=-1)[index]


def embed_keys(head, provider, keys, batch_size=256):
    """{key: normalised embedding} of images through the current head (no grad; for validation)."""
    embeddings = {}
    with torch.no_grad():
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            embeddings.update(zip(chunk, head_embeddings(head, provider, chunk).cpu().numpy()))
    return embeddings


def batch_embeddings(head, provider, slots):
    """6-slot samples (lists of keys, None = pad) -> L2-normalised embeddings [B, 6, D]."""
    flat = [key for sample in slots for key in sample]
    return head_embeddings(head, provider, flat).view(len(slots), len(slots[0]), -1)


def held_out_scores(held, embeddings):
    """SSR/PA per source and pooled over the given sources, with the evaluation's metric functions."""
    dim = len(next(iter(embeddings.values())))
    views, view_mask = slot_embeddings(embeddings, held.views, dim)
    margins = {}
    for source, columns in held.distractors.items():
        distractors, distractor_mask = slot_embeddings(embeddings, columns, dim)
        margins[source] = metrics.nearid_margins(views, distractors, view_mask, distractor_mask)
    per_source = {source: metrics.nearid_scores(*m) for source, m in margins.items()}
    return {"per_source": per_source, "pooled": metrics.nearid_pooled_scores(margins, sources=list(margins))}


# --- logging and checkpoints -----------------------------------------------------------------------


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


def completed_checkpoints(output_dir):
    """Checkpoint folders that finished writing (staging folders are never renamed into place half done)."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / "position.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(run):
    """Model, optimizer, scheduler, RNG and data position; written to a staging folder, then renamed."""
    from nearid.io import atomic_write_json

    root = Path(run.args.output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{run.global_step:07d}"
    staging = root / f".{final.name}.partial"
    accelerator = run.accelerator
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(staging / "position.json", {"global_step": run.global_step, "run": run.run_key})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in completed_checkpoints(run.args.output_dir)[:-run.args.checkpoints_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume(run):
    """Load the requested checkpoint into the run; returns the global step to continue from."""
    wanted = run.args.resume_from_checkpoint
    if not wanted:
        return 0
    if wanted == "latest":
        found = completed_checkpoints(run.args.output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no completed checkpoint under "
                                    f"{Path(run.args.output_dir) / 'checkpoints'}; start without it")
        path = found[-1]
    else:
        path = Path(wanted)
        if not (path / "position.json").is_file():
            raise FileNotFoundError(f"{path} is not a completed checkpoint (no position.json); "
                                    "pass 'latest' or a folder under OUTPUT_DIR/checkpoints")
    position = json.loads((path / "position.json").read_text())
    changed = {k: (position["run"].get(k), v) for k, v in run.run_key.items() if position["run"].get(k) != v}
    if changed:
        raise ValueError(f"cannot resume from {path}: these settings differ from the checkpoint's "
                         f"(checkpoint, now): {changed}. Resume with the same settings or start a new --output_dir.")
    run.accelerator.load_state(str(path))
    run.accelerator.print(f"resumed from {path} at step {position['global_step']}")
    return position["global_step"]


def resume_key(data_args, model_args, train_args, num_processes):
    """Settings a resumed run must share with the checkpoint for the data order and schedule to line up."""
    names = ("seed", "num_epochs", "per_device_batch_size", "learning_rate", "weight_decay", "warmup_steps",
             "temperature", "alpha", "mask_padded")
    key = {name: getattr(train_args, name) for name in names}
    key.update(asdict(data_args), base_model=model_args.base_model, num_processes=num_processes)
    key.pop("skip_bad_images")
    return key


def prepare_output_dir(args, accelerator):
    out = Path(args.output_dir)
    previous = completed_checkpoints(out) or (out / "train_results.json").exists()
    if previous and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise FileExistsError(f"{out} already holds a training run. Continue it with --resume_from_checkpoint latest, "
                              "choose another --output_dir, or pass --overwrite_output_dir to start afresh.")
    if accelerator.is_main_process and previous and args.overwrite_output_dir and not args.resume_from_checkpoint:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "logs.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


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
    history: list = field(default_factory=list)


def make_accelerator(args):
    from accelerate import Accelerator

    trackers = [t for t in args.report_to.split(",") if t and t != "none"]
    log_with = [jsonl_tracker(Path(args.output_dir) / "logs.jsonl") if t == "jsonl" else t for t in trackers]
    # Without an accelerator device, accelerate joins the processes of a launch (torchrun, gloo) only
    # when told to use the CPU; otherwise every process would train alone on the whole data.
    return Accelerator(mixed_precision=args.mixed_precision, log_with=log_with or None, cpu=not has_accelerator())


def has_accelerator():
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, MPS, XPU, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def process_share(order, step, run):
    """This process's samples of global batch `step`: consecutive blocks in rank order (rank-major pool)."""
    per_device, accelerator = run.args.per_device_batch_size, run.accelerator
    start = step * per_device * accelerator.num_processes + accelerator.process_index * per_device
    return order[start:start + per_device]


def train_step(run, epoch, samples):
    """One optimisation step on this process's samples; returns the loss output (global values)."""
    slots = [run.training_set.sample_slots(epoch, index, run.args.seed) for index in samples]
    mask = torch.tensor([slot_mask(s) for s in slots], device=run.accelerator.device)
    with run.accelerator.autocast():
        embeddings = batch_embeddings(run.head, run.provider, slots)
        loss = nearid_loss(embeddings, mask, run.args.temperature, run.args.alpha, run.args.mask_padded)
    if not torch.isfinite(loss.total):
        raise FloatingPointError(
            f"non-finite loss ({loss.total.item()}) at step {run.global_step + 1} (epoch {epoch}, samples "
            f"{list(samples)[:8]}{'...' if len(samples) > 8 else ''} of this process); stopped before the update, "
            f"no checkpoint was written for it. Try --mixed_precision no or a lower --learning_rate, and resume "
            "from the last checkpoint with --resume_from_checkpoint latest.")
    run.accelerator.backward(loss.loss)
    if run.accelerator.sync_gradients:
        run.accelerator.clip_grad_norm_(run.head.parameters(), run.args.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss


def validate(run, name="val"):
    """SSR/PA of the current head on a held-out split (main process); logged and kept in the history."""
    held = run.held_out.get(name)
    if held is None or not run.accelerator.is_main_process:
        run.accelerator.wait_for_everyone()
        return None
    head = run.accelerator.unwrap_model(run.head).eval()
    scores = held_out_scores(held, embed_keys(head, run.provider, list(held.items)))
    head.train()
    pooled = scores["pooled"]
    run.accelerator.log({f"{name}/ssr": pooled["ssr"], f"{name}/pa": pooled["pa"]}, step=run.global_step)
    run.accelerator.print(f"step {run.global_step}: {name} SSR {pooled['ssr']:.2f} PA {pooled['pa']:.2f} "
                          f"({pooled['n_samples']} samples)")
    run.history.append({"step": run.global_step, "split": name, **scores})
    run.accelerator.wait_for_everyone()
    return scores


def log_interval(run, loss, started, epoch):
    seconds = time.perf_counter() - started
    values = {"loss": loss.total.item(), "tier1": loss.tier1.item(), "tier2": loss.tier2.item(),
              "lr": run.scheduler.get_last_lr()[0], "epoch": epoch}
    run.accelerator.log(values, step=run.global_step)
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


def train(run, last_step):
    """Epochs of steps from run.global_step to last_step; the data position follows from the step alone."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    bar = tqdm(total=last_step, initial=run.global_step, desc="training", unit="step",
               disable=not run.accelerator.is_local_main_process)
    run.head.train()
    while run.global_step < last_step:
        epoch, step = divmod(run.global_step, run.steps_per_epoch)
        order = run.training_set.epoch_order(epoch, run.args.seed)
        for step in range(step, run.steps_per_epoch):
            loss = train_step(run, epoch, process_share(order, step, run))
            run.global_step += 1
            bar.update(1)
            after_step(run, loss, started, epoch, end_of_epoch=step == run.steps_per_epoch - 1)
            if run.global_step >= last_step:
                break
    bar.close()


# --- setting up, finishing -------------------------------------------------------------------------


def make_provider(model, processor, training_set, held_out, data_args, args, accelerator):
    """Token cache (default) or the backbone every step; returns (provider, skipped images)."""
    # A chained view, not a copy: the training set's mapping reads image bytes only when looked up.
    items = ChainMap(training_set.items, *(held.items for held in held_out.values()))
    if not args.token_cache:
        return BackboneEveryStep(model, items, PixelLoader(processor), accelerator.device), {}
    keys = sorted(training_set.used_keys(range(args.num_epochs), args.seed)
                  | {k for held in held_out.values() for k in held.items})
    cache, skipped = build_token_cache(model, processor, keys, items, args, data_args.skip_bad_images, accelerator)
    named = {items[key][1]: reason for key, reason in skipped.items()}  # before the indexes forget the keys
    if skipped:
        training_set.drop_images(set(skipped))
        for held in held_out.values():  # validation scores a skipped image as missing
            held.items.retain(set(held.items) - set(skipped))
        for where, reason in named.items():
            accelerator.print(f"skipped unreadable image {where}: {reason}")
    return CachedTokens(cache, accelerator.device), named


def make_run(data_args, model_args, args, accelerator, training_set, held_out, provider, model):
    from transformers import get_cosine_schedule_with_warmup

    global_batch = args.per_device_batch_size * accelerator.num_processes
    steps_per_epoch = len(training_set) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(training_set)} samples per epoch, fewer than one global batch "
                         f"({args.per_device_batch_size} x {accelerator.num_processes} processes); lower "
                         "--per_device_batch_size or add data")
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=args.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    total_steps = steps_per_epoch * args.num_epochs
    # Stepped once per optimisation step by the loop itself (not prepared: accelerate would step it
    # once per process), so the schedule is the same for any number of processes.
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)
    head, optimizer = accelerator.prepare(model.head, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    key = resume_key(data_args, model_args, args, accelerator.num_processes)
    return Run(args, accelerator, model, head, optimizer, scheduler, provider, training_set, held_out, key,
               steps_per_epoch, total_steps)


def datasets_used(data_args):
    return [data_args.positives] + [s.split("=", 1)[1] for s in data_args.source] + ([data_args.mtg] if data_args.mtg else [])


def eval_results(scores, split):
    """model-index entries (the Hub's evaluation widget) from held-out SSR/PA."""
    return [{"task_type": "image-feature-extraction", "dataset_type": "nearid", "dataset_name": f"NearID ({split} split)",
             "dataset_split": split, "metric_type": name, "metric_name": name.upper(),
             "metric_value": round(scores["pooled"][name], 2)} for name in ("ssr", "pa")]


def export(run, processor, data_args, model_args, all_args, final):
    """The release folder: a complete Hub repo with its model card."""
    from nearid.hub import export_hub_folder

    args = run.args
    split, scores = final if final else (None, None)
    card = {"repo_id": args.push_to_hub, "base_model": model_args.base_model, "datasets": datasets_used(data_args),
            "training_args": all_args, "eval_results": eval_results(scores, split) if scores else None,
            "model_name": args.push_to_hub or f"nearid-{Path(args.output_dir).resolve().name}"}
    folder = export_hub_folder(run.model, processor, Path(args.output_dir) / "release", overwrite=True,
                               model_card=card)
    print(f"exported {folder}")
    return folder


def push(args, folder):
    """Upload the release folder in one commit; a failure leaves it intact and says how to retry."""
    from nearid.hub import push_to_hub

    url = push_to_hub(folder, args.push_to_hub, private=args.hub_private, revision=args.hub_revision,
                      commit_message=args.hub_commit_message or "Upload NearID trained with train.py")
    print(f"pushed to {url}")
    return url


def check_push_possible(args):
    """Before hours of training: a push needs the export and a token (the upload itself comes last)."""
    if not args.push_to_hub:
        return
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    if not args.export:
        raise SystemExit("--push_to_hub uploads the release folder, so it needs --export true")
    validate_repo_id(args.push_to_hub)
    if not get_token():
        raise SystemExit("--push_to_hub needs a Hugging Face token with write access: log in with "
                         "`hf auth login` or set HF_TOKEN, then run again (nothing was trained yet).")


def finish(run, processor, data_args, model_args, all_args, skipped, describe):
    """Final held-out evaluation (test if given, else val), export, results file, then the push."""
    from nearid.io import atomic_write_json

    final_split = "test" if "test" in run.held_out else ("val" if "val" in run.held_out else None)
    scores = validate(run, final_split) if final_split else None
    if not run.accelerator.is_main_process:
        return None
    results = {"global_step": run.global_step, "final_split": final_split, "final": scores,
               "history": run.history, "skipped_images": skipped, "data": describe, "arguments": all_args}
    folder = export(run, processor, data_args, model_args, all_args, (final_split, scores) if scores else None) \
        if run.args.export else None
    results["release"] = str(folder) if folder else None
    results_path = Path(run.args.output_dir) / "train_results.json"
    atomic_write_json(results_path, results)  # written before the upload: a failed push loses nothing
    if run.args.push_to_hub:
        results["pushed"] = push(run.args, folder)
        atomic_write_json(results_path, results)
    return results


def main(argv=None):
    from nearid.io import atomic_write_json

    data_args, model_args, args = parse_arguments(argv)
    check_push_possible(args)
    accelerator = make_accelerator(args)
    out = prepare_output_dir(args, accelerator)
    all_args = {**asdict(data_args), **asdict(model_args), **asdict(args), "num_processes": accelerator.num_processes}
    if accelerator.is_main_process:
        atomic_write_json(out / "train_args.json", all_args)
    accelerator.init_trackers("nearid", config={k: str(v) for k, v in all_args.items()})
    training_set, held_out, provenance, split_sizes = load_data(data_args)
    accelerator.print(f"training data: {json.dumps(training_set.describe(), default=str)}")
    model, processor = nearid_from_siglip(model_args.base_model, model_args.base_revision)
    model.to(accelerator.device)
    provider, skipped = make_provider(model, processor, training_set, held_out, data_args, args, accelerator)
    describe = {**training_set.describe(), "splits": split_sizes, "datasets": provenance}  # counts skipped images
    run = make_run(data_args, model_args, args, accelerator, training_set, held_out, provider, model)
    run.global_step = resume(run)
    last_step = min(run.total_steps, args.max_steps or run.total_steps)
    train(run, last_step)
    if not completed_checkpoints(out) or completed_checkpoints(out)[-1].name != f"{CHECKPOINT_PREFIX}{run.global_step:07d}":
        save_checkpoint(run)
    results = finish(run, processor, data_args, model_args, all_args, skipped, describe)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
