"""The training loop of NearID's head: the run state, one optimisation step, validation, the loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nearid import tokens, training_data
from nearid.evaluation import protocol
from nearid.loss import nearid_loss
from nearid.numerics import autocast
from nearid.training.state import save_checkpoint


@dataclass
class Run:
    """Everything the loop touches, in one place."""

    args: object  # the training arguments (train.py's `TrainingArguments`)
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


def make_optimizer(head, args, total_steps):
    """AdamW over the head's parameters and its warmup-then-cosine schedule."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    # Stepped once per optimisation step by the loop itself (not prepared: accelerate would step it
    # once per process), so the schedule is the same for any number of processes.
    return optimizer, get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)


def prepare_head(model, args, accelerator, total_steps):
    """(prepared head, prepared optimizer, schedule) of `model`'s head."""
    optimizer, scheduler = make_optimizer(model.head, args, total_steps)
    head, optimizer = accelerator.prepare(model.head, optimizer)
    # accelerate wraps a prepared model's forward in autocast of its own. The step and validation enter
    # autocast through `numerics.autocast` instead, as the token pass and the scorers do, so that wrapper is
    # taken off again; the accelerator keeps what autocast cannot do, fp16's loss scaler.
    accelerator.unwrap_model(head, keep_fp32_wrapper=False)
    return head, optimizer, scheduler


def make_run(args, accelerator, model, provider, training_set, held_out, run_key):
    """The run of `args` over `training_set`: the prepared head, its optimizer and schedule."""
    global_batch = args.per_device_batch_size * accelerator.num_processes
    steps_per_epoch = len(training_set) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(training_set)} samples per epoch, fewer than one global batch "
                         f"({args.per_device_batch_size} x {accelerator.num_processes} processes); lower "
                         "--per-device-batch-size or add data")
    total_steps = steps_per_epoch * args.num_epochs
    warn_long_warmup(args, total_steps, accelerator)
    head, optimizer, scheduler = prepare_head(model, args, accelerator, total_steps)
    return Run(args, accelerator, model, head, optimizer, scheduler, provider, training_set, held_out, run_key,
               steps_per_epoch, total_steps)


def steps_only_run(args, accelerator, model, provider, total_steps):
    """A run that takes `train_step`s on batches it is given, with no data, held-out sets or checkpoints
    (the benchmarks time the real step with it)."""
    head, optimizer, scheduler = prepare_head(model, args, accelerator, total_steps)
    return Run(args, accelerator, model, head, optimizer, scheduler, provider, None, {}, {}, total_steps,
               total_steps)


def warn_long_warmup(args, total_steps, accelerator):
    steps = min(total_steps, args.max_steps or total_steps)
    if args.warmup_steps > 0.25 * steps:
        accelerator.print(f"warning: --warmup-steps {args.warmup_steps} covers {min(args.warmup_steps, steps)} of the "
                          f"{steps} steps this run trains ({100 * min(1.0, args.warmup_steps / steps):.0f}%): the "
                          "learning rate is still rising for most of the run. The paper's 100 warmup steps fit "
                          "~3,300 steps; use a few percent of yours.")


def train_step(run, epoch, batch):
    """One optimisation step on this process's batch (`TokenBatches`); returns the loss output (global values)."""
    with autocast(run.accelerator.device, run.args.mixed_precision):
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
    """The evaluation's NearID summary of a held-out set (`protocol.nearid_summary`), and under "pooled"
    the headline a model card publishes (`protocol.nearid_headline`: FluxC never in it)."""
    dim = len(next(iter(embeddings.values())))
    margins = protocol.nearid_margins_by_source(embeddings, held.views, held.distractors, dim)
    summary = protocol.nearid_summary(margins)
    return {**summary, "pooled": protocol.nearid_headline(summary)}


def validate(run, name="val"):
    """SSR/PA of the current head on a held-out split (main process); logged and kept in the history."""
    held = run.held_out.get(name)
    if held is None or not run.accelerator.is_main_process:
        run.accelerator.wait_for_everyone()
        return None
    head = run.accelerator.unwrap_model(run.head).eval()
    with autocast(run.accelerator.device, run.args.mixed_precision):
        embeddings = tokens.embed_keys(head, run.provider, list(held.items))
    scores = held_out_scores(held, embeddings)
    head.train()
    pooled = scores["pooled"]
    if pooled is None:
        run.accelerator.print(f"step {run.global_step}: {name}: only FluxC sources given, which no pool includes; "
                              "see per_source in the history")
    else:
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
    at = lambda every: (run.global_step % every == 0) if every else end_of_epoch
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
