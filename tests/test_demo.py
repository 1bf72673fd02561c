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

    attention = result["object_attention"]  # the trained head looks at the object more than SigLIP's did
    assert attention["after"] > attention["before"] + 0.05, attention

    printed = capsys.readouterr().out
    assert f"untrained {100 * attention['before']:.1f}%, trained {100 * attention['after']:.1f}%" in printed
    assert "NearID head, untrained" in printed and f"{after[NEARID_SSR]:.2f}" in printed
    assert (tmp_path / "before_after.md").read_text().strip() in printed

    card = ModelCard.load(Path(result["release"]) / "README.md")
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert set(metrics) == {"ssr", "pa"} and card.data.base_model
