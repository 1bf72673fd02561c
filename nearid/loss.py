"""The two-tier NearID training loss as a pure function of embeddings (docs/method.md section 2).

Each sample holds 6 image slots in `SLOTS` order: an anchor, P = 2 positives (other views of the
same object instance) and K = 3 hard negatives, where `neg_s` is the near-identity distractor
inpainted into the *same scene* as slot s.

- Tier 1 (multi-positive InfoNCE): the anchor must pick its own positive out of the positive pool
  (the positives of every sample on every process) and its own hard negatives.
- Tier 2: every hard negative must score above the soft maximum (logsumexp) of the pool rows that
  are not the sample's own positives: a near-identity distractor is still more similar to the
  anchor than a random other object, so the embedding keeps its semantic structure.

With `torch.distributed` initialised, the pool is gathered with gradients and all averages are
global, so data-parallel training optimises exactly the loss of one process on the whole batch.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

SLOTS = ("anchor", "pos1", "pos2", "neg_a", "neg_p1", "neg_p2")
ANCHOR_SLOT = 0
POSITIVE_SLOTS = slice(1, 3)
NEGATIVE_SLOTS = slice(3, 6)
NUM_POSITIVES = 2


@dataclass
class NearIDLossOutput:
    """What `nearid_loss` returns.

    `loss` is what to call `backward` on. With several processes it is this rank's share of the
    global loss times the world size, so that the rank-averaged gradients (what DDP computes) equal
    the gradients of the global loss; it is therefore *not* the value to log. `tier1`, `tier2` and
    `total` are the detached global values, identical on every rank.
    """

    loss: torch.Tensor
    tier1: torch.Tensor
    tier2: torch.Tensor
    total: torch.Tensor


def nearid_loss(
    embeddings: torch.Tensor,
    slot_mask: torch.Tensor,
    temperature: float = 0.07,
    alpha: float = 0.5,
    mask_padded: bool = False,
) -> NearIDLossOutput:
    """Tier 1 + alpha * Tier 2 of NearID for one per-process batch.

    Args:
        embeddings: [B, 6, D] float, L2-normalised, slots in `SLOTS` order. Padded slots still
            carry an embedding (the reference embeds a grey all-zero pixel tensor there).
        slot_mask: [B, 6] bool, True where the slot holds a real image. Every anchor must be True.
        temperature: T, the logits are cosine similarities / T.
        alpha: weight of Tier 2.
        mask_padded: False (the reference's behaviour) keeps padded slots in the pool and in the
            Tier-1 denominators; they only never serve as targets or Tier-2 terms. True removes
            padded pool rows and padded negatives from every denominator and logsumexp.

    Shapes inside, with W processes and M = W * B * 2 pool rows:
        pool [M, D] (rank-major, then sample, then positive: sample b's positive j of this rank is
        row rank * B * 2 + b * 2 + j), pool logits [B, M], hard-negative logits [B, K = 3].

    Computes in float32 (float64 for float64 inputs). Every average is global (counts are summed
    over processes); nothing to average gives a zero loss that is still connected to the graph.
    """
    _check_inputs(embeddings, slot_mask, temperature)
    world_size, rank = _world()
    slot_mask = slot_mask.to(embeddings.device)
    _check_consistent_batches(embeddings, slot_mask, world_size)
    # Half-precision logits / 0.07 lose too much; float64 inputs (tests) keep their precision.
    embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))

    anchors = embeddings[:, ANCHOR_SLOT]  # [B, D]
    positives = embeddings[:, POSITIVE_SLOTS]  # [B, P, D]
    negatives = embeddings[:, NEGATIVE_SLOTS]  # [B, K, D]
    positive_mask = slot_mask[:, POSITIVE_SLOTS]  # [B, P]
    negative_mask = slot_mask[:, NEGATIVE_SLOTS]  # [B, K]

    pool, pool_mask = _gather_positive_pool(positives, positive_mask, world_size)  # [M, D], [M]
    pool_logits = anchors @ pool.T / temperature  # [B, M]
    negative_logits = torch.einsum("bd,bkd->bk", anchors, negatives) / temperature  # [B, K]
    own_rows = _own_pool_rows(len(anchors), rank, embeddings.device)  # [B, P]
    # The reference keeps padded slots in every denominator; the cleaner variant drops them.
    pool_kept = pool_mask if mask_padded else torch.ones_like(pool_mask)
    negatives_kept = negative_mask if mask_padded else torch.ones_like(negative_mask)

    tier1_terms = _tier1_terms(pool_logits, negative_logits, own_rows, pool_kept, negatives_kept)  # [B, P]
    tier2_terms = _tier2_terms(pool_logits, negative_logits, own_rows, pool_kept)  # [B, K]

    counts = torch.cat([positive_mask.sum(0), negative_mask.sum().view(1)]).to(embeddings.dtype)
    counts = _all_reduce_sum(counts, world_size)  # [P + 1]: global present positives j, then negatives
    tier1_share = _tier1_share(tier1_terms, positive_mask, counts[:NUM_POSITIVES])
    tier2_share = _masked_sum(tier2_terms, negative_mask) / counts[NUM_POSITIVES].clamp(min=1)

    tier1, tier2 = _all_reduce_sum(torch.stack([tier1_share, tier2_share]).detach(), world_size)
    return NearIDLossOutput(
        loss=world_size * (tier1_share + alpha * tier2_share),
        tier1=tier1,
        tier2=tier2,
        total=tier1 + alpha * tier2,
    )


# --------------------------------------------------------------------------------------------------
# The two tiers


def _tier1_terms(pool_logits, negative_logits, own_rows, pool_kept, negatives_kept):
    """[B, P] cross-entropy of picking own positive j among the kept pool rows and hard negatives.

    The logits are the same for every j, only the target differs, so one logsumexp serves all j.
    Targets are read from the unmasked logits: a present target is always kept, and a padded one
    is zeroed by the caller's mask.
    """
    all_logits = torch.cat([pool_logits, negative_logits], dim=1)  # [B, M + K]
    kept = torch.cat([pool_kept.expand_as(pool_logits), negatives_kept], dim=1)
    log_denominator = _masked_logsumexp(all_logits, kept)  # [B]
    return log_denominator[:, None] - pool_logits.gather(1, own_rows)


def _tier2_terms(pool_logits, negative_logits, own_rows, pool_kept):
    """[B, K] softplus(LSE_b - s_bk): hard negative k should score above the other objects' LSE."""
    not_own = torch.ones_like(pool_logits, dtype=torch.bool).scatter(1, own_rows, False)
    others = _masked_logsumexp(pool_logits, not_own & pool_kept)  # [B], -inf without other rows
    return F.softplus(others[:, None] - negative_logits)


def _tier1_share(terms, positive_mask, global_counts):
    """This process's part of mean over j (with any present sample) of mean over present samples."""
    j_has_samples = global_counts > 0
    per_j = _masked_sum(terms, positive_mask, dim=0) / global_counts.clamp(min=1)  # [P]
    return per_j.sum() / j_has_samples.sum().clamp(min=1)


def _masked_sum(values, mask, dim=None):
    """Sum of `values` where `mask`; `torch.where` (not a product) so that inf/nan outside stay out."""
    selected = torch.where(mask, values, torch.zeros_like(values))
    return selected.sum() if dim is None else selected.sum(dim)


def _masked_logsumexp(logits, kept):
    """Row-wise logsumexp over the kept entries; -inf with zero (not NaN) gradient for empty rows."""
    row_has_any = kept.any(dim=1, keepdim=True)
    safe = logits.masked_fill(~kept, float("-inf")).masked_fill(~row_has_any, 0.0)
    return torch.logsumexp(safe, dim=1).masked_fill(~row_has_any.squeeze(1), float("-inf"))


def _own_pool_rows(batch_size, rank, device):
    """[B, P] pool row of this rank's sample b, positive j: rank * B * P + b * P + j."""
    samples = torch.arange(batch_size, device=device)[:, None]
    positives = torch.arange(NUM_POSITIVES, device=device)[None, :]
    return rank * batch_size * NUM_POSITIVES + samples * NUM_POSITIVES + positives


# --------------------------------------------------------------------------------------------------
# Data parallel plumbing


def _world():
    """(world size, rank); (1, 0) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather_positive_pool(positives, positive_mask, world_size):
    """[M, D] positives of every process (rank-major) with gradients, and their [M] presence."""
    pool = positives.reshape(-1, positives.shape[-1])
    pool_mask = positive_mask.reshape(-1)
    if world_size == 1:
        return pool, pool_mask
    # Imported here: torch.distributed.nn is not loaded by `import torch.distributed`.
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    # The autograd all_gather sends each rank's gradient w.r.t. the gathered rows back to their
    # owner, so every process's positives learn from every process's anchors.
    pool = torch.cat(all_gather_with_grad(pool))
    # Collectives on bool tensors are not supported by every backend; uint8 is.
    masks = [torch.empty_like(pool_mask, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(masks, pool_mask.to(torch.uint8))
    return pool, torch.cat(masks).bool()


def _all_reduce_sum(tensor, world_size):
    if world_size > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _check_consistent_batches(embeddings, slot_mask, world_size):
    """Every process must bring the same [B, 6, D] and only present anchors; raise on all ranks."""
    missing_anchors = int((~slot_mask[:, ANCHOR_SLOT]).sum())
    header = torch.tensor([embeddings.shape[0], embeddings.shape[2], missing_anchors], device=embeddings.device)
    headers = [header]
    if world_size > 1:
        # Gathered before any other collective, so that a mismatch raises on every rank instead of
        # hanging the ranks whose all_gather waits for a differently shaped tensor.
        headers = [torch.empty_like(header) for _ in range(world_size)]
        dist.all_gather(headers, header)
    headers = [h.tolist() for h in headers]

    bad_ranks = [rank for rank, (_, _, missing) in enumerate(headers) if missing > 0]
    if bad_ranks:
        samples = (~slot_mask[:, ANCHOR_SLOT]).nonzero().flatten().tolist()
        where = f"samples {samples}" if world_size == 1 else f"processes {bad_ranks} (here: samples {samples})"
        raise ValueError(
            f"nearid_loss needs an anchor in every sample, but slot_mask[:, 0] is False for {where}. "
            f"The anchor is one of the sample's present views: fix the data assembly."
        )
    shapes = [(batch, dim) for batch, dim, _ in headers]
    if len(set(shapes)) > 1:
        raise ValueError(
            f"nearid_loss needs the same batch size and embedding size on every process, got "
            f"(B, D) per rank = {shapes}. Drop the last incomplete batch (drop_last=True) or pad "
            f"every process to the same batch size."
        )


def _check_inputs(embeddings, slot_mask, temperature):
    if not (isinstance(embeddings, torch.Tensor) and embeddings.is_floating_point()):
        raise ValueError(f"embeddings must be a floating point tensor, got {_describe(embeddings)}.")
    if embeddings.dim() != 3 or embeddings.shape[1] != len(SLOTS) or embeddings.shape[0] == 0:
        raise ValueError(
            f"embeddings must have shape [B, {len(SLOTS)}, D] with B >= 1 (slots {SLOTS}), got "
            f"{tuple(embeddings.shape)}."
        )
    if not (isinstance(slot_mask, torch.Tensor) and slot_mask.dtype == torch.bool):
        raise ValueError(f"slot_mask must be a bool tensor, got {_describe(slot_mask)}.")
    if slot_mask.shape != embeddings.shape[:2]:
        raise ValueError(
            f"slot_mask must have shape [B, {len(SLOTS)}] = {tuple(embeddings.shape[:2])} to match "
            f"embeddings, got {tuple(slot_mask.shape)}."
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
