"""The main job end to end: the head trained on the synthetic benchmark beats the untrained one, and
lowers the near-identity retrieval's distractor-first rate."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from nearid.reports.tables import MTG_SSR, NEARID_PA, NEARID_SSR


def test_demo_trains_a_head_that_beats_the_untrained_one(demo_run):
    result, output_dir = demo_run["result"], demo_run["output_dir"]
    before, after = result["before"], result["after"]
    assert after[NEARID_SSR] >= before[NEARID_SSR] + 15, (before, after)
    assert after[NEARID_PA] >= before[NEARID_PA] + 20, (before, after)
    assert after[MTG_SSR] > before[MTG_SSR], (before, after)
    retrieval = result["retrieval"]  # the trained head no longer ranks the same-scene distractor first as often
    assert retrieval["after"]["distractor_first_rate"] < retrieval["before"]["distractor_first_rate"] - 20, retrieval
    assert retrieval["after"]["map"] > retrieval["before"]["map"], retrieval

    attention = result["object_attention"]  # the trained head looks at the object more than SigLIP's did
    assert attention["after"] > attention["before"] + 0.05, attention

    printed = demo_run["printed"]
    assert f"untrained {100 * attention['before']:.1f}%, trained {100 * attention['after']:.1f}%" in printed
    assert "NearID head, untrained" in printed and f"{after[NEARID_SSR]:.2f}" in printed
    assert (output_dir / "demo_results.md").read_text().strip() in printed  # what it printed, kept in a file
    saved = json.loads((output_dir / "demo_results.json").read_text())
    assert saved["after"] == pytest.approx(after) and saved["before"] == pytest.approx(before)
    assert saved["retrieval"]["after"]["map"] == pytest.approx(retrieval["after"]["map"])

    # Trained from a local base model on local synthetic data: the release card claims no Hub base model,
    # dataset or benchmark result, and lists the synthetic results in its text as local data.
    card = ModelCard.load(Path(result["release"]) / "README.md")
    assert card.data.eval_results is None and card.data.base_model is None and card.data.datasets is None
    assert "| NearID benchmark (local data) | test | NearID SSR |" in card.text
