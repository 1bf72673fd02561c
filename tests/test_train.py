"""train.py end to end on the train_synthetic benchmark: outputs, cache equivalence, exact resume, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

import train
from nearid.models import nearid_from_siglip
from tests.helpers import logged_losses, train_args

HEAD_PREFIX = "backbone.vision_model.head."


def head_weights(folder):
    return {k: v for k, v in load_file(folder / "model.safetensors").items()}


def test_end_to_end_outputs(train_synthetic, base_model, tmp_path):
    out = tmp_path / "run"
    results = train.main(train_args(train_synthetic, base_model, out, "--checkpoints_total_limit", "2"))
    assert {"train_args.json", "logs.jsonl", "train_results.json", "checkpoints", "release", "token_cache"} <= \
        {p.name for p in out.iterdir()}
    assert len(train.completed_checkpoints(out)) == 2  # the newest K kept
    assert results["final_split"] == "test" and results["final"]["pooled"]["n_samples"] > 0
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
    common = ("--num_epochs", "1", "--export", "false", "--token_cache_dtype", "float32")
    cached = train.main(train_args(train_synthetic, base_model, tmp_path / "cached", *common))
    reference = train.main(train_args(train_synthetic, base_model, tmp_path / "reference", *common, "--token_cache", "false"))
    a, b = logged_losses(tmp_path / "cached"), logged_losses(tmp_path / "reference")
    assert len(a) == len(b) == cached["global_step"] == reference["global_step"]
    for (step_a, loss_a), (step_b, loss_b) in zip(a, b):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-4, abs=1e-5)


def test_resume_after_a_kill_ends_with_the_same_weights(train_synthetic, base_model, tmp_path, monkeypatch):
    common = ("--checkpointing_steps", "3", "--export", "false")
    full = tmp_path / "full"
    train.main(train_args(train_synthetic, base_model, full, *common))

    interrupted = tmp_path / "interrupted"
    real_step, calls = train.train_step, {"n": 0}

    def killed_at_step_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(train_synthetic, base_model, interrupted, *common))
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.completed_checkpoints(interrupted)[-1].name == "step-0000006"
    train.main(train_args(train_synthetic, base_model, interrupted, *common, "--resume_from_checkpoint", "latest"))

    final_full, final_resumed = train.completed_checkpoints(full)[-1], train.completed_checkpoints(interrupted)[-1]
    assert final_full.name == final_resumed.name
    a, b = head_weights(final_full), head_weights(final_resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(full)[-1] == logged_losses(interrupted)[-1]


def test_test_rows_are_never_trained_on(train_synthetic, base_model):
    data_args = train.DataArguments(positives=str(train_synthetic / "positives"),
                                    source=[f"flux={train_synthetic / 'flux'}"],
                                    test_split=str(train_synthetic / "splits" / "test.json"))
    training_set, held_out, _, sizes = train.load_data(data_args)
    test_images = set(held_out["test"].items)
    assert sizes["test"] > 0 and test_images
    assert not test_images & set(training_set.items)


def test_non_finite_loss_stops_with_the_step_named(train_synthetic, base_model, tmp_path, monkeypatch):
    real_loss = train.nearid_loss

    def poisoned(*args, **kwargs):
        output = real_loss(*args, **kwargs)
        output.total = output.total * float("nan")
        return output

    monkeypatch.setattr(train, "nearid_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"at step 1 \(epoch 0"):
        train.main(train_args(train_synthetic, base_model, out))
    assert not train.completed_checkpoints(out) and not (out / "release").exists()


def test_existing_run_is_not_overwritten(train_synthetic, base_model, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(train_synthetic, base_model, out, "--max_steps", "2", "--export", "false"))
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest"):
        train.main(train_args(train_synthetic, base_model, out, "--max_steps", "2", "--export", "false"))


def test_resume_refuses_changed_settings(train_synthetic, base_model, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(train_synthetic, base_model, out, "--max_steps", "2", "--export", "false"))
    with pytest.raises(ValueError, match="per_device_batch_size"):
        train.main(train_args(train_synthetic, base_model, out, "--max_steps", "2", "--export", "false",
                              "--resume_from_checkpoint", "latest", "--per_device_batch_size", "3"))


def test_bad_arguments_are_explained(train_synthetic, base_model, tmp_path):
    base = train_args(train_synthetic, base_model, tmp_path / "x")
    with pytest.raises(SystemExit, match="NAME=SRC"):
        train.main(base + ["--source", "no-equals-sign"])
    with pytest.raises(ValueError, match="global batch"):
        train.main(base + ["--per_device_batch_size", "1000"])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        train.main(base + ["--val_split", str(empty)])


def test_push_to_hub_uploads_the_release_in_one_commit(train_synthetic, base_model, tmp_path, hub, monkeypatch):
    from tests.fake_hub import commit_payload

    monkeypatch.setenv("HF_TOKEN", "hf_fake_write_token")
    out = tmp_path / "run"
    results = train.main(train_args(train_synthetic, base_model, out, "--max_steps", "2", "--push_to_hub",
                                    "someone/nearid-test", "--hub_revision", "exp", "--hub_commit_message", "Run 1"))
    commits = hub.calls("commit/")
    assert len(commits) == 1 and commits[0].url.path == "/api/models/someone/nearid-test/commit/exp"
    header, files = commit_payload(commits[0])
    release = out / "release"
    assert header["summary"] == "Run 1"
    assert files == {p.name: p.read_bytes() for p in release.iterdir()}
    assert "README.md" in files and b"someone/nearid-test" in files["README.md"]
    assert results["pushed"].startswith("https://huggingface.co/someone/nearid-test/commit/")


def test_failed_push_keeps_the_release_and_results(train_synthetic, base_model, tmp_path, hub, monkeypatch):
    from nearid.hub import HubPushError

    monkeypatch.setenv("HF_TOKEN", "hf_fake_write_token")
    hub.commit_status = 500
    out = tmp_path / "run"
    with pytest.raises(HubPushError, match="nearid.hub push"):
        train.main(train_args(train_synthetic, base_model, out, "--max_steps", "2", "--push_to_hub", "someone/x"))
    assert (out / "release" / "model.safetensors").is_file()
    assert json.loads((out / "train_results.json").read_text())["release"] == str(out / "release")


def test_push_without_a_token_stops_before_training(train_synthetic, base_model, tmp_path, hub, monkeypatch):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))
    with pytest.raises(SystemExit, match="hf auth login"):
        train.main(train_args(train_synthetic, base_model, tmp_path / "run", "--push_to_hub", "someone/x"))
    assert not (tmp_path / "run").exists() and not hub.requests
