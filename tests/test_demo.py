"""The main job end to end: the head trained on the synthetic benchmark beats the untrained one, and
lowers the near-identity retrieval's distractor-first rate."""

from pathlib import Path

from huggingface_hub import ModelCard

from nearid.commands import demo
from nearid.reports import MTG_SSR, NEARID_PA, NEARID_SSR


def test_demo_trains_a_head_that_beats_the_untrained_one(tmp_path, capsys):
    result = demo.main(["--output-dir", str(tmp_path)])
    before, after = result["before"], result["after"]
    assert after[NEARID_SSR] >= before[NEARID_SSR] + 15, (before, after)
    assert after[NEARID_PA] >= before[NEARID_PA] + 20, (before, after)
    assert after[MTG_SSR] > before[MTG_SSR], (before, after)
    retrieval = result["retrieval"]  # the trained head no longer ranks the same-scene distractor first as often
    assert retrieval["after"]["distractor_first_rate"] < retrieval["before"]["distractor_first_rate"] - 20, retrieval
    assert retrieval["after"]["map"] > retrieval["before"]["map"], retrieval

    printed = capsys.readouterr().out
    assert "NearID head, untrained" in printed and f"{after[NEARID_SSR]:.2f}" in printed
    assert (tmp_path / "before_after.md").read_text().strip() in printed

    # Trained from a local base model on local synthetic data: the release card claims no Hub base model,
    # dataset or benchmark result, and lists the synthetic results in its text as local data.
    card = ModelCard.load(Path(result["release"]) / "README.md")
    assert card.data.eval_results is None and card.data.base_model is None and card.data.datasets is None
    assert "| NearID benchmark (local data) | test | NearID SSR |" in card.text
