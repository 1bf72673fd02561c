"""train.py end to end on the train_synthetic benchmark: outputs, cache equivalence, exact resume, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nearid.commands import train
from nearid import checkpoints
from nearid.models import nearid_from_siglip
from nearid.training import inputs, loop
from tests.helpers import kill_training_at_step, logged_losses, serve_as_hub_datasets, train_args, user_error

HEAD_PREFIX = "backbone.vision_model.head."


def head_weights(checkpoint):
    return load_file(checkpoint / "head.safetensors")


def test_end_to_end_outputs(train_synthetic, base_model, tmp_path):
    out = tmp_path / "run"
    results = train.main(train_args(train_synthetic, base_model, out, "--checkpoints-total-limit", "2"))
    assert {"train_args.json", "logs.jsonl", "train_results.json", "checkpoints", "release", "token_cache"} <= \
        {p.name for p in out.iterdir()}
    assert len(checkpoints.completed(out)) == 2  # the newest K kept
    assert results["final_split"] == "test" and results["final"]["pooled"]["n_samples"] > 0
    written = json.loads((out / "train_results.json").read_text())
    provenance = written["provenance"]  # as every evaluate result has it
    assert provenance["model"]["name_or_path"] == str(base_model) and provenance["git"] and provenance["versions"]
    assert provenance["split_file"] == str(train_synthetic / "splits" / "test.json")
    assert provenance["split_file_sha256"] and len(provenance["datasets"]) == 4  # positives, flux, sdxl, mtg
    assert {"train_args.json", "training_loss.png"} <= set(written["files"])
    losses = logged_losses(out)
    assert [s for s, _ in losses] == list(range(1, results["global_step"] + 1))
    release = out / "release"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_nearid.py",
            "configuration_nearid.py", "image_processing_nearid.py"} <= {p.name for p in release.iterdir()}
    exported = load_file(release / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in exported.values())
    base = nearid_from_siglip(str(base_model))[0].state_dict()
    moved = [k for k in exported if not torch.equal(exported[k].float(), base[k].half().float())]
    assert moved and all(k.startswith(HEAD_PREFIX) for k in moved)  # only the head trained


def test_token_cache_gives_the_reference_loss_curve(train_synthetic, base_model, tmp_path):
    """Training on cached float32 tokens equals running the backbone on every slot at every step."""
    common = ("--num-epochs", "1", "--no-export", "--cache-dtype", "float32")
    cached = train.main(train_args(train_synthetic, base_model, tmp_path / "cached", *common))
    reference = train.main(train_args(train_synthetic, base_model, tmp_path / "reference", *common, "--no-token-cache"))
    a, b = logged_losses(tmp_path / "cached"), logged_losses(tmp_path / "reference")
    assert len(a) == len(b) == cached["global_step"] == reference["global_step"]
    for (step_a, loss_a), (step_b, loss_b) in zip(a, b):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-4, abs=1e-5)


def test_resume_after_a_kill_ends_with_the_same_weights(train_synthetic, base_model, tmp_path, monkeypatch):
    common = ("--checkpointing-steps", "3", "--no-export")
    full = tmp_path / "full"
    train.main(train_args(train_synthetic, base_model, full, *common))

    interrupted = tmp_path / "interrupted"
    real_step = kill_training_at_step(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(train_synthetic, base_model, interrupted, *common))
    monkeypatch.setattr(loop, "train_step", real_step)
    assert checkpoints.completed(interrupted)[-1].name == "step-0000006"
    train.main(train_args(train_synthetic, base_model, interrupted, *common, "--resume-from-checkpoint", "latest"))

    final_full, final_resumed = checkpoints.completed(full)[-1], checkpoints.completed(interrupted)[-1]
    assert final_full.name == final_resumed.name
    a, b = head_weights(final_full), head_weights(final_resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(full)[-1] == logged_losses(interrupted)[-1]


def test_test_rows_are_never_trained_on(train_synthetic, base_model):
    data_args = train.DataArguments(positives=str(train_synthetic / "positives"),
                                    source=[f"flux={train_synthetic / 'flux'}"],
                                    test_split=str(train_synthetic / "splits" / "test.json"))
    training_set, held_out, _, sizes = inputs.load_data(data_args)
    test_images = set(held_out["test"].items)
    assert sizes["test"] > 0 and test_images
    assert not test_images & set(training_set.items)


def test_non_finite_loss_stops_with_the_step_named(train_synthetic, base_model, tmp_path, monkeypatch, capsys):
    real_loss = loop.nearid_loss

    def poisoned(*args, **kwargs):
        output = real_loss(*args, **kwargs)
        output.total = output.total * float("nan")
        return output

    monkeypatch.setattr(loop, "nearid_loss", poisoned)
    out = tmp_path / "nan"
    assert "at step 1 (epoch 0" in user_error(capsys, train.main, train_args(train_synthetic, base_model, out))
    assert not checkpoints.completed(out) and not (out / "release").exists()


def test_existing_run_is_not_overwritten(train_synthetic, base_model, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(train_synthetic, base_model, out, "--max-steps", "2", "--no-export"))
    message = user_error(capsys, train.main, train_args(train_synthetic, base_model, out, "--max-steps", "2",
                                                        "--no-export"))
    assert "--resume-from-checkpoint latest" in message and "--overwrite-output-dir" in message


def test_resume_refuses_changed_settings(train_synthetic, base_model, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(train_synthetic, base_model, out, "--max-steps", "2", "--no-export"))
    message = user_error(capsys, train.main, train_args(train_synthetic, base_model, out, "--max-steps", "2",
                                                        "--no-export", "--resume-from-checkpoint", "latest",
                                                        "--per-device-batch-size", "3"))
    assert "--per-device-batch-size is 4 in the checkpoint and 3 now" in message


def test_bad_arguments_are_explained(train_synthetic, base_model, tmp_path, capsys):
    base = train_args(train_synthetic, base_model, tmp_path / "x")
    assert "NAME=SRC" in user_error(capsys, train.main, base + ["--source", "no-equals-sign"])
    assert "global batch" in user_error(capsys, train.main, base + ["--per-device-batch-size", "1000"])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert "empty" in user_error(capsys, train.main, base + ["--val-split", str(empty)])


def test_push_to_hub_uploads_the_release_in_one_commit(train_synthetic, base_model, tmp_path, hub, monkeypatch):
    from tests.fake_hub import commit_payload

    monkeypatch.setenv("HF_TOKEN", "hf_fake_write_token")
    out = tmp_path / "run"
    results = train.main(train_args(train_synthetic, base_model, out, "--max-steps", "2", "--push-to-hub",
                                    "someone/nearid-test", "--hub-revision", "exp", "--hub-commit-message", "Run 1"))
    commits = hub.calls("commit/")
    assert len(commits) == 1 and commits[0].url.path == "/api/models/someone/nearid-test/commit/exp"
    header, files = commit_payload(commits[0])
    release = out / "release"
    assert header["summary"] == "Run 1"
    assert files == {p.name: p.read_bytes() for p in release.iterdir()}
    assert "README.md" in files and b"someone/nearid-test" in files["README.md"]
    assert results["pushed"].startswith("https://huggingface.co/someone/nearid-test/commit/")


def test_failed_push_keeps_the_release_and_results(train_synthetic, base_model, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_write_token")
    hub.commit_status = 500
    out = tmp_path / "run"
    message = user_error(capsys, train.main, train_args(train_synthetic, base_model, out, "--max-steps", "2",
                                                        "--push-to-hub", "someone/x"))
    assert "-m nearid.hub push" in message
    assert (out / "release" / "model.safetensors").is_file()
    assert json.loads((out / "train_results.json").read_text())["release"] == str(out / "release")


def test_push_without_a_token_stops_before_training(train_synthetic, base_model, tmp_path, hub, monkeypatch, capsys):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))
    assert "hf auth login" in user_error(capsys, train.main, train_args(train_synthetic, base_model, tmp_path / "run",
                                                                        "--push-to-hub", "someone/x"))
    assert not (tmp_path / "run").exists() and not hub.requests


def test_evaluating_a_release_with_model_index_replaces_its_entries(train_synthetic, base_model, tmp_path,
                                                                    monkeypatch):
    """One card builder: the release's own NearID entries are replaced by evaluate.py, not duplicated."""
    from huggingface_hub import ModelCard

    from nearid.commands import evaluate

    # The data is read as the Hub datasets at a recorded commit: only then are results filed under them.
    hub = serve_as_hub_datasets(monkeypatch, {"someone/nearid-mini": train_synthetic / "positives",
                                              "someone/nearid-mini-Flux": train_synthetic / "flux",
                                              "someone/nearid-mini-SDXL": train_synthetic / "sdxl"})
    local = {str(train_synthetic / "positives"): hub["someone/nearid-mini"],
             f"flux={train_synthetic / 'flux'}": f"flux={hub['someone/nearid-mini-Flux']}",
             f"sdxl={train_synthetic / 'sdxl'}": f"sdxl={hub['someone/nearid-mini-SDXL']}"}
    out = tmp_path / "run"
    train.main([local.get(a, a) for a in train_args(train_synthetic, base_model, out, "--max-steps", "2")])
    readme = out / "release" / "README.md"
    before_text = readme.read_text()
    before = ModelCard.load(readme).data.eval_results
    assert [(r.dataset_type, r.dataset_split, r.metric_type) for r in before] == [
        ("someone/nearid-mini", "test", "ssr"), ("someone/nearid-mini", "test", "pa")]

    result = evaluate.main(["nearid", "--model", str(out / "release"), "--positives", hub["someone/nearid-mini"],
                            "--source", f"flux={hub['someone/nearid-mini-Flux']}",
                            "--source", f"sdxl={hub['someone/nearid-mini-SDXL']}",
                            "--split-file", str(train_synthetic / "splits" / "test.json"), "--model-index", str(readme),
                            "--output-dir", str(tmp_path / "eval"), "--cache-dir", str(tmp_path / "cache")])
    after = ModelCard.load(readme).data.eval_results
    assert [(r.dataset_type, r.dataset_split, r.metric_type) for r in after] == [
        (r.dataset_type, r.dataset_split, r.metric_type) for r in before]
    assert [r.metric_value for r in after] == [round(result["pooled_given"][k], 4) for k in ("ssr", "pa")]
    assert readme.read_text().split("\n---\n", 1)[1] == before_text.split("\n---\n", 1)[1]  # the body is kept


def test_the_train_card_and_the_evaluate_card_publish_one_headline(train_synthetic, base_model, tmp_path,
                                                                    monkeypatch):
    """FluxC is reported apart and enters no pool: the card train.py writes and the one evaluate.py
    --model-index writes name the same headline, measured on the same samples."""
    from huggingface_hub import ModelCard

    from nearid.commands import evaluate

    hub = serve_as_hub_datasets(monkeypatch, {"someone/nearid-mini": train_synthetic / "positives",
                                              "someone/nearid-mini-Flux": train_synthetic / "flux",
                                              "someone/nearid-mini-FluxC": train_synthetic / "sdxl"})
    sources = ["--source", f"flux={hub['someone/nearid-mini-Flux']}",
               "--source", f"fluxc={hub['someone/nearid-mini-FluxC']}"]
    local = {str(train_synthetic / "positives"): hub["someone/nearid-mini"]}
    args = [local.get(a, a) for a in train_args(train_synthetic, base_model, tmp_path / "run", "--max-steps", "2")]
    args = [*args[:2], *sources, *args[6:]]  # flux and fluxc instead of flux and sdxl
    trained = train.main(args)
    readme = tmp_path / "run" / "release" / "README.md"
    before = ModelCard.load(readme).data.eval_results

    result = evaluate.main(["nearid", "--model", str(tmp_path / "run" / "release"), "--positives",
                            hub["someone/nearid-mini"], *sources,
                            "--split-file", str(train_synthetic / "splits" / "test.json"), "--model-index", str(readme),
                            "--output-dir", str(tmp_path / "eval"), "--cache-dir", str(tmp_path / "cache")])
    after = ModelCard.load(readme).data.eval_results
    headline, final = result["pooled_given"], trained["final"]["pooled"]
    assert (final["n_samples"], final["n_sources"]) == (headline["n_samples"], headline["n_sources"]) == \
        (trained["final"]["per_source"]["flux"]["n_samples"], 1)
    assert [(r.dataset_type, r.dataset_split, r.metric_type) for r in after] == [
        (r.dataset_type, r.dataset_split, r.metric_type) for r in before]
    assert [r.metric_value for r in before] == [round(final[k], 4) for k in ("ssr", "pa")]
    assert [r.metric_value for r in after] == [round(headline[k], 4) for k in ("ssr", "pa")]


def test_no_test_inherits_the_accelerator_state_of_an_earlier_training():
    """Runs after this module's in-process trainings (pytest keeps the file's order): conftest.py's
    `fresh_accelerator_state` has reset accelerate's process-wide state, mixed precision included."""
    from accelerate.state import AcceleratorState, PartialState

    assert AcceleratorState._shared_state == {} and PartialState._shared_state == {}
