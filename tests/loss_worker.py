"""One process of the 2-process `nearid_loss` test (run by tests/test_loss.py, not by pytest itself).

Usage (from the repository root): python -m tests.loss_worker RANK WORLD_SIZE STORE_FILE OUT_DIR

Every process builds the same problem (`make_problem`): a linear head mapping random features to
embeddings, and one batch of W * B samples. Rank r takes samples [r * B, (r + 1) * B), computes the
loss, backpropagates, averages the head gradients over ranks (what DDP does) and saves what it
found to OUT_DIR/rank{r}.pt. The test compares that with one process on the whole batch.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nearid.loss import nearid_loss

BATCH_PER_RANK = 3
FEATURES = 12
EMBED_DIM = 8


def make_problem(world_size, seed=0):
    """(head, features [W*B, 6, F], slot_mask [W*B, 6]) with some padded slots but every anchor."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(FEATURES, EMBED_DIM)
    with torch.no_grad():
        head.weight.copy_(torch.randn(EMBED_DIM, FEATURES, generator=generator))
        head.bias.copy_(torch.randn(EMBED_DIM, generator=generator))
    total = world_size * BATCH_PER_RANK
    features = torch.randn(total, 6, FEATURES, generator=generator)
    slot_mask = torch.rand(total, 6, generator=generator) > 0.3
    slot_mask[:, 0] = True
    return head, features, slot_mask


def embed(head, features):
    return torch.nn.functional.normalize(head(features), dim=-1)


def head_gradients(head, features, slot_mask, mask_padded):
    """(loss output, {param name: gradient}) of this process's batch, before any averaging."""
    head.zero_grad()
    output = nearid_loss(embed(head, features), slot_mask, mask_padded=mask_padded)
    output.loss.backward()
    return output, {name: param.grad.clone() for name, param in head.named_parameters()}


def run(rank, world_size):
    head, features, slot_mask = make_problem(world_size)
    mine = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    results = {}
    for mask_padded in (False, True):
        output, grads = head_gradients(head, features[mine], slot_mask[mine], mask_padded)
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world_size
        results[f"mask_padded={mask_padded}"] = dict(
            loss=output.loss.detach(), tier1=output.tier1, tier2=output.tier2, total=output.total, grads=grads
        )
    results["mismatch_error"] = batch_size_mismatch_error(head, features, slot_mask, rank)
    return results


def batch_size_mismatch_error(head, features, slot_mask, rank):
    """The ValueError message when rank 0 brings one sample more than the others (None: no error)."""
    size = BATCH_PER_RANK + (1 if rank == 0 else 0)
    try:
        nearid_loss(embed(head, features[:size]), slot_mask[:size])
    except ValueError as error:
        return str(error)
    return None


def main(rank, world_size, store_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    try:
        results = run(rank, world_size)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
