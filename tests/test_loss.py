"""nearid_loss: equal to a per-sample loop written from docs/method.md section 2, known answers, the padded-slot
quirk, input errors, and 2 processes equal to 1 process on the concatenated batch."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nearid.loss import SLOTS, nearid_loss
from tests.helpers import REPO_ROOT
from tests.loss_worker import head_gradients, make_problem

T = 0.07
POSITIVES = (1, 2)
NEGATIVES = (3, 4, 5)


def naive_nearid_loss(embeddings, slot_mask, temperature=T, alpha=0.5, mask_padded=False):
    """docs/method.md section 2 for one process, one sample and one logit at a time: (tier1, tier2, total)."""
    batch = len(embeddings)
    pool = [(b, slot) for b in range(batch) for slot in POSITIVES]
    zero = embeddings.sum() * 0

    def logit(b, other, slot):
        return embeddings[b, 0] @ embeddings[other, slot] / temperature

    def in_denominators(b, slot):
        return bool(slot_mask[b, slot]) or not mask_padded

    per_positive = []
    for j in POSITIVES:
        terms = []
        for b in range(batch):
            if not slot_mask[b, j]:
                continue
            logits = [logit(b, pb, ps) for pb, ps in pool if in_denominators(pb, ps)]
            logits += [logit(b, b, k) for k in NEGATIVES if in_denominators(b, k)]
            terms.append(torch.logsumexp(torch.stack(logits), 0) - logit(b, b, j))
        if terms:
            per_positive.append(torch.stack(terms).mean())
    tier1 = torch.stack(per_positive).mean() if per_positive else zero

    terms = []
    for b in range(batch):
        others = [logit(b, pb, ps) for pb, ps in pool if pb != b and in_denominators(pb, ps)]
        for k in NEGATIVES:
            if slot_mask[b, k]:
                # logsumexp of nothing is -inf, and softplus(-inf) = 0.
                terms.append(F.softplus(torch.logsumexp(torch.stack(others), 0) - logit(b, b, k)) if others else zero)
    tier2 = torch.stack(terms).mean() if terms else zero
    return tier1, tier2, tier1 + alpha * tier2


def random_batch(batch, seed, dim=16, dtype=torch.float64, missing=0.3):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(batch, 6, dim, generator=generator, dtype=dtype), dim=-1)
    slot_mask = torch.rand(batch, 6, generator=generator) > missing
    slot_mask[:, 0] = True
    return embeddings, slot_mask


def orthonormal(count, dim):
    return torch.linalg.qr(torch.randn(dim, count, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0].T


@pytest.mark.parametrize("mask_padded", [False, True])
@pytest.mark.parametrize("batch, seed", [(1, 0), (2, 1), (5, 2), (8, 3), (8, 4)])
def test_matches_the_naive_loop(batch, seed, mask_padded):
    embeddings, slot_mask = random_batch(batch, seed)
    embeddings.requires_grad_(True)
    output = nearid_loss(embeddings, slot_mask, mask_padded=mask_padded)
    tier1, tier2, total = naive_nearid_loss(embeddings, slot_mask, mask_padded=mask_padded)

    torch.testing.assert_close(output.tier1, tier1.detach())
    torch.testing.assert_close(output.tier2, tier2.detach())
    torch.testing.assert_close(output.total, total.detach())
    torch.testing.assert_close(output.loss.detach(), total.detach())  # one process: no rescaling
    (grad,) = torch.autograd.grad(output.loss, embeddings)
    (expected_grad,) = torch.autograd.grad(total, embeddings)
    torch.testing.assert_close(grad, expected_grad)


def test_matches_the_naive_loop_with_other_temperature_and_alpha():
    embeddings, slot_mask = random_batch(6, seed=5, missing=0.5)
    output = nearid_loss(embeddings, slot_mask, temperature=0.3, alpha=2.0, mask_padded=True)
    expected = naive_nearid_loss(embeddings, slot_mask, temperature=0.3, alpha=2.0, mask_padded=True)
    torch.testing.assert_close(torch.stack([output.tier1, output.tier2, output.total]), torch.stack(expected))


def test_the_random_batches_exercise_padded_slots():
    """Guards the naive comparison: it must see padded positives and negatives, not full batches."""
    _, slot_mask = random_batch(8, seed=3)
    assert not slot_mask[:, 1:3].all() and not slot_mask[:, 3:].all()


@pytest.mark.parametrize("batch", [2, 5])
def test_identical_embeddings_give_log_counts(batch):
    # Every logit equals 1/T. Tier 1: each present target among all 2B pool rows and 3 negatives.
    # Tier 2: softplus(1/T + log(2B - 2) - 1/T) = log(2B - 1).
    direction = F.normalize(torch.arange(1.0, 9.0, dtype=torch.float64), dim=0)
    embeddings = direction.expand(batch, 6, 8).clone()
    _, slot_mask = random_batch(batch, seed=batch, missing=0.4)
    slot_mask[0] = True  # at least one present positive and negative
    output = nearid_loss(embeddings, slot_mask)
    torch.testing.assert_close(output.tier1.item(), math.log(2 * batch + 3))
    torch.testing.assert_close(output.tier2.item(), math.log(2 * batch - 1))
    torch.testing.assert_close(output.total.item(), math.log(2 * batch + 3) + 0.5 * math.log(2 * batch - 1))


def test_separated_embeddings_give_the_closed_form():
    # Sample b lives on its own plane: anchor = both positives = e_b, its distractors at cosine c,
    # all other samples orthogonal. The other own positive stays in the Tier-1 denominator, so
    # Tier 1 tends to log 2, not 0; Tier 2 tends to 0 as the distractors beat the other objects.
    batch, cosine = 4, 0.5
    basis = orthonormal(2 * batch, dim=2 * batch + 3)
    embeddings = torch.empty(batch, 6, basis.shape[1], dtype=torch.float64)
    for b in range(batch):
        embeddings[b, :3] = basis[2 * b]
        embeddings[b, 3:] = cosine * basis[2 * b] + math.sqrt(1 - cosine**2) * basis[2 * b + 1]
    output = nearid_loss(embeddings, torch.ones(batch, 6, dtype=torch.bool))

    pool = 2 * batch
    tier1 = math.log(2 * math.exp(1 / T) + (pool - 2) + 3 * math.exp(cosine / T)) - 1 / T
    tier2 = math.log1p(math.exp(math.log(pool - 2) - cosine / T))
    torch.testing.assert_close(output.tier1.item(), tier1)
    torch.testing.assert_close(output.tier2.item(), tier2)
    assert abs(output.tier1.item() - math.log(2)) < 0.02 and output.tier2.item() < 0.01


def test_padded_slots_change_the_loss_only_without_masking():
    """The reference quirk: padded embeddings sit in the denominators unless mask_padded=True."""
    embeddings, slot_mask = random_batch(4, seed=7, missing=0.0)
    slot_mask[1, 2] = slot_mask[2, 4] = False  # one padded positive, one padded negative
    moved = embeddings.clone()
    moved[1, 2] = -embeddings[1, 2]
    moved[2, 4] = F.normalize(torch.ones_like(embeddings[2, 4]), dim=0)

    def totals(mask_padded):
        return [nearid_loss(e, slot_mask, mask_padded=mask_padded).total for e in (embeddings, moved)]

    reference, reference_moved = totals(mask_padded=False)
    masked, masked_moved = totals(mask_padded=True)
    assert (reference - reference_moved).abs() > 1e-3
    torch.testing.assert_close(masked, masked_moved, atol=0, rtol=0)

    # Same statement through the gradients: no gradient reaches padded slots when masked.
    embeddings.requires_grad_(True)
    (grad,) = torch.autograd.grad(nearid_loss(embeddings, slot_mask, mask_padded=True).loss, embeddings)
    assert torch.all(grad[~slot_mask] == 0) and torch.all(grad[slot_mask].abs().sum(-1) > 0)


@pytest.mark.parametrize("mask_padded", [False, True])
def test_no_valid_terms_give_a_connected_zero(mask_padded):
    embeddings, _ = random_batch(1, seed=8)
    embeddings.requires_grad_(True)
    only_anchor = torch.tensor([[True, False, False, False, False, False]])
    output = nearid_loss(embeddings, only_anchor, mask_padded=mask_padded)
    assert output.loss.requires_grad and output.loss.item() == 0 and output.total.item() == 0
    output.loss.backward()
    assert torch.all(embeddings.grad == 0)  # zero, not NaN from an empty logsumexp


def test_half_precision_is_computed_in_float32():
    embeddings, slot_mask = random_batch(5, seed=9, dtype=torch.float16)
    embeddings.requires_grad_(True)
    output = nearid_loss(embeddings, slot_mask)
    expected = nearid_loss(embeddings.detach().float(), slot_mask)
    assert output.total.dtype == torch.float32
    torch.testing.assert_close(output.total, expected.total, atol=0, rtol=0)
    output.loss.backward()
    assert embeddings.grad.dtype == torch.float16 and torch.isfinite(embeddings.grad).all()


def test_missing_anchor_is_an_error():
    embeddings, slot_mask = random_batch(4, seed=10)
    slot_mask[2, 0] = False
    with pytest.raises(ValueError, match=r"anchor in every sample.*samples \[2\]"):
        nearid_loss(embeddings, slot_mask)


@pytest.mark.parametrize(
    "embeddings_shape, mask_shape, message",
    [
        ((4, 16), (4, 6), r"shape \[B, 6, D\].*got \(4, 16\)"),
        ((4, 5, 16), (4, 5), r"shape \[B, 6, D\].*got \(4, 5, 16\)"),
        ((0, 6, 16), (0, 6), r"B >= 1"),
        ((4, 6, 16), (3, 6), r"slot_mask must have shape \[B, 6\] = \(4, 6\).*got \(3, 6\)"),
    ],
)
def test_wrong_shapes_are_errors(embeddings_shape, mask_shape, message):
    with pytest.raises(ValueError, match=message):
        nearid_loss(torch.zeros(embeddings_shape), torch.ones(mask_shape, dtype=torch.bool))


def test_wrong_types_are_errors():
    embeddings, slot_mask = random_batch(2, seed=11)
    with pytest.raises(ValueError, match="slot_mask must be a bool tensor, got a torch.int64"):
        nearid_loss(embeddings, slot_mask.long())
    with pytest.raises(ValueError, match="embeddings must be a floating point tensor"):
        nearid_loss(embeddings.long(), slot_mask)
    with pytest.raises(ValueError, match="temperature must be positive"):
        nearid_loss(embeddings, slot_mask, temperature=0.0)


def test_slot_names():
    assert SLOTS == ("anchor", "pos1", "pos2", "neg_a", "neg_p1", "neg_p2")


# --------------------------------------------------------------------------------------------------
# Two processes (CPU, gloo)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """What each of 2 worker processes saved. Each exits 0, or is killed by a signal after saving: gloo
    processes sometimes abort (or hang, and are killed) at exit after finishing their work."""
    out = tmp_path_factory.mktemp("loss_ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store = out / "store"  # a file store: no TCP port to find or collide on
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.loss_worker", str(rank), "2", str(store), str(out)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    finished = [finish(process, timeout=240) for process in processes]
    results = []
    for rank, (code, log) in enumerate(finished):
        path = out / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} saved no results, exit code {code}; its output:\n{log}"
        assert code <= 0, f"rank {rank} exited with status {code}; its output:\n{log}"  # < 0: a signal
        results.append(torch.load(path))
    return results


def finish(process, timeout):
    """The exit code and output of `process`, killed if it has not ended within `timeout` seconds (a hang at
    exit)."""
    try:
        output = process.communicate(timeout=timeout)[0]
        return process.returncode, output
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0] + f"\n[killed after {timeout} s]"
        return process.returncode, output


@pytest.mark.parametrize("mask_padded", [False, True])
def test_two_processes_match_one_process_on_the_whole_batch(two_process_results, mask_padded):
    head, features, slot_mask = make_problem(world_size=2)
    assert not slot_mask.all()  # padded slots take part
    expected, expected_grads = head_gradients(head, features, slot_mask, mask_padded)
    ranks = [result[f"mask_padded={mask_padded}"] for result in two_process_results]
    for rank in ranks:
        for name in ("tier1", "tier2", "total"):
            torch.testing.assert_close(rank[name], getattr(expected, name))
        for name, grad in expected_grads.items():
            torch.testing.assert_close(rank["grads"][name], grad)
    # Each rank's backward loss is W times its share: their mean is the global loss.
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, expected.total)
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])  # the shares differ; the test sees them


def test_different_batch_sizes_raise_on_every_process(two_process_results):
    for result in two_process_results:
        assert result["mismatch_error"] is not None
        assert "same batch size" in result["mismatch_error"] and "[(4, 8), (3, 8)]" in result["mismatch_error"]
