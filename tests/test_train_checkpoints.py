"""Checkpoints and output folders of train.py: nothing executed from a checkpoint, damaged files named with
the way out, a full disk said plainly, runs never mixed, the validation history kept across a resume."""

import errno
import json
import pickle
import shutil

import pytest
from safetensors.torch import load_file

from nearid.commands import train
from nearid import checkpoints
from nearid.training import loop
from tests.helpers import kill_training_at_step, train_args, user_error

STEPS = ("--checkpointing-steps", "2", "--no-export")


class Payload:
    """A pickle that runs code when loaded: it writes a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture(scope="module")
def stopped_run(train_synthetic, base_model, tmp_path_factory):
    """A run stopped after 4 steps, with checkpoints at steps 2 and 4 (trained once for the module)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train.main(train_args(train_synthetic, base_model, out, *STEPS, "--max-steps", "4"))
    assert [p.name for p in checkpoints.completed(out)] == ["step-0000002", "step-0000004"]
    return out


@pytest.fixture
def run(stopped_run, train_synthetic, base_model, tmp_path):
    """A copy of the stopped run for one test to damage or resume; returns (args maker, output folder)."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)

    def args(*extra):
        return train_args(train_synthetic, base_model, out, *STEPS, *extra)

    return args, out


def test_a_checkpoint_holds_only_safetensors_and_json(run):
    _, out = run
    names = {p.name for p in checkpoints.completed(out)[-1].iterdir()}
    assert names == set(checkpoints.FILES)  # no pickle, no RNG state


def test_pickles_in_a_checkpoint_are_never_loaded(run, tmp_path):
    args, out = run
    latest = checkpoints.completed(out)[-1]
    ran = tmp_path / "code_ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (latest / name).write_bytes(pickle.dumps(Payload(ran)))
    train.main(args("--resume-from-checkpoint", "latest", "--max-steps", "6"))
    assert not ran.exists()
    assert checkpoints.completed(out)[-1].name == "step-0000006"


def test_a_pickle_in_place_of_a_checkpoint_file_is_refused_unread(run, tmp_path, capsys):
    args, out = run
    latest = checkpoints.completed(out)[-1]
    ran = tmp_path / "code_ran"
    (latest / "optimizer.safetensors").write_bytes(pickle.dumps(Payload(ran)))
    message = user_error(capsys, train.main, args("--resume-from-checkpoint", "latest"))
    assert "optimizer.safetensors has" in message and "--resume-from-checkpoint step-0000002" in message
    assert not ran.exists()


@pytest.mark.parametrize("name, damage, says", [
    ("head.safetensors", "truncate", "head.safetensors has 20 bytes"),
    ("optimizer.safetensors", "truncate", "optimizer.safetensors has 20 bytes"),
    ("head.safetensors", "delete", "head.safetensors is missing"),
    ("position.json", "garble", "position.json has 17 bytes"),
    ("scheduler.json", "garble", "scheduler.json has 17 bytes"),
    ("checksums.json", "garble", "checksums.json cannot be read"),
])
def test_a_damaged_checkpoint_file_is_named_with_the_previous_checkpoint_offered(run, capsys, name, damage, says):
    args, out = run
    path = checkpoints.completed(out)[-1] / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:20])
    elif damage == "delete":
        path.unlink()
    else:
        path.write_text("{this is not json")
    message = user_error(capsys, train.main, args("--resume-from-checkpoint", "latest"))
    assert says in message and "--resume-from-checkpoint step-0000002" in message, message
    assert "step-0000004" in message  # the damaged checkpoint is named too


def flip_lowest_bit(path):
    """A single-bit change in the lowest mantissa bit of the first tensor: the file still loads, one value off."""
    data = bytearray(path.read_bytes())
    header_bytes = int.from_bytes(data[:8], "little")
    data[8 + header_bytes] ^= 1
    path.write_bytes(bytes(data))


def test_a_low_bit_flip_in_the_head_is_named_with_the_intact_previous_checkpoint_offered(run, capsys):
    args, out = run
    head = checkpoints.completed(out)[-1] / "head.safetensors"
    before = {k: v.clone() for k, v in load_file(head).items()}
    flip_lowest_bit(head)
    assert any((load_file(head)[k] != v).any() for k, v in before.items())  # loads, slightly different
    message = user_error(capsys, train.main, args("--resume-from-checkpoint", "latest"))
    assert "step-0000004/head.safetensors does not match the checksum" in message, message
    assert "--resume-from-checkpoint step-0000002" in message


def test_a_damaged_earlier_checkpoint_is_not_offered(run, capsys):
    args, out = run
    for folder in checkpoints.completed(out):
        flip_lowest_bit(folder / "head.safetensors")
    message = user_error(capsys, train.main, args("--resume-from-checkpoint", "latest"))
    assert "step-0000004/head.safetensors does not match" in message and "No intact earlier checkpoint" in message


def test_the_previous_checkpoint_then_resumes(run):
    args, out = run
    (checkpoints.completed(out)[-1] / "head.safetensors").unlink()
    train.main(args("--resume-from-checkpoint", "step-0000002", "--max-steps", "6"))
    assert checkpoints.completed(out)[-1].name == "step-0000006"


def test_a_full_disk_while_saving_says_so_and_keeps_the_last_checkpoint(run, monkeypatch, capsys):
    args, out = run

    def full_disk(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4032 vs 3936")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    message = user_error(capsys, train.main, args("--resume-from-checkpoint", "latest", "--max-steps", "6"))
    assert "disk is full while writing" in message and "checkpoints" in message
    assert [p.name for p in checkpoints.completed(out)] == ["step-0000002", "step-0000004"]
    assert not list((out / "checkpoints").glob(".*partial"))


def test_resume_latest_without_a_checkpoint_fails_before_any_work(train_synthetic, base_model, tmp_path, capsys):
    out = tmp_path / "fresh"
    message = user_error(capsys, train.main, train_args(train_synthetic, base_model, out, "--resume-from-checkpoint",
                                                        "latest"))
    assert "no completed checkpoint" in message
    assert not (out / "token_cache").exists()  # failed before the (hours-long, for so400m) token pass


def test_repeated_source_names_are_refused(train_synthetic, base_model, tmp_path, capsys):
    args = train_args(train_synthetic, base_model, tmp_path / "run", "--source", f"flux={train_synthetic / 'sdxl'}")
    assert "names 'flux' twice" in user_error(capsys, train.main, args)


def test_overwrite_then_a_crash_leaves_nothing_of_the_old_run(train_synthetic, base_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(train_args(train_synthetic, base_model, out, "--max-steps", "2"))
    assert (out / "train_results.json").is_file() and (out / "release").is_dir()
    kill_training_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(train_synthetic, base_model, out, "--overwrite-output-dir", "--checkpointing-steps", "1"))
    left = {p.name for p in out.iterdir()}
    assert "train_results.json" not in left and "release" not in left
    assert [p.name for p in checkpoints.completed(out)] == ["step-0000001"]  # only the new run's work


def test_the_validation_history_survives_two_kills(train_synthetic, base_model, tmp_path, monkeypatch):
    common = ("--validation-steps", "1", "--checkpointing-steps", "2", "--no-export")
    full = train.main(train_args(train_synthetic, base_model, tmp_path / "full", *common))
    out = tmp_path / "killed"
    real_step = loop.train_step
    for _ in range(2):  # the first run dies at its 3rd step, the resumed one at its 3rd too
        kill_training_at_step(monkeypatch, 3)
        resume = ("--resume-from-checkpoint", "latest") if checkpoints.completed(out) else ()
        with pytest.raises(KeyboardInterrupt):
            train.main(train_args(train_synthetic, base_model, out, *common, *resume))
        monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train.main(train_args(train_synthetic, base_model, out, *common, "--resume-from-checkpoint", "latest"))
    assert [(v["step"], v["split"]) for v in resumed["history"]] == [(v["step"], v["split"]) for v in full["history"]]
    on_disk = json.loads((out / "train_results.json").read_text())
    validations = [v["step"] for v in on_disk["history"] if v["split"] == "val"]
    assert validations == list(range(1, full["global_step"] + 1))  # every step's validation, none lost
    final_full = load_file(checkpoints.completed(tmp_path / "full")[-1] / "head.safetensors")
    final_killed = load_file(checkpoints.completed(out)[-1] / "head.safetensors")
    assert all((final_full[k] == final_killed[k]).all() for k in final_full)


def test_disk_full_errors_are_recognised():
    from nearid.io import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4032 vs 3936"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))


@pytest.mark.parametrize("changed, says", [
    (["--max-grad-norm", "0.5"], "--max-grad-norm is 1.0 in the checkpoint and 0.5 now"),
    (["--cache-dtype", "int8"], "--cache-dtype is 'float16' in the checkpoint and 'int8' now"),
    (["--no-token-cache"], "--token-cache is True in the checkpoint and False now"),
])
def test_resume_refuses_each_changed_setting_naming_both_values(run, capsys, changed, says):
    args, _ = run
    message = user_error(capsys, train.main, args("--resume-from-checkpoint", "latest", *changed))
    assert says in message, message


def test_a_changed_setting_is_refused_before_any_token_is_computed(run, capsys, tmp_path):
    args, out = run
    cache = tmp_path / "new_cache"
    message = user_error(capsys, train.main, args("--resume-from-checkpoint", "latest", "--cache-dtype", "int8",
                                                  "--max-grad-norm", "2", "--cache-dir", str(cache)))
    assert "--cache-dtype is 'float16'" in message and "--max-grad-norm is 1.0" in message
    assert not cache.exists()


def test_logs_do_not_repeat_steps_after_a_resume(train_synthetic, base_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kill_training_at_step(monkeypatch, 6)  # steps 1-5 logged, the last checkpoint at step 3
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(train_synthetic, base_model, out, "--checkpointing-steps", "3", "--no-export"))
    monkeypatch.undo()
    train.main(train_args(train_synthetic, base_model, out, "--checkpointing-steps", "3", "--no-export",
                          "--resume-from-checkpoint", "latest", "--max-steps", "8"))
    steps = [json.loads(line)["step"] for line in (out / "logs.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))


def test_a_checkpoint_written_before_checksums_resumes_with_a_warning(run, caplog):
    args, out = run
    (checkpoints.completed(out)[-1] / "checksums.json").unlink()
    with caplog.at_level("WARNING", logger="nearid.checkpoints"):
        train.main(args("--resume-from-checkpoint", "latest", "--max-steps", "6"))
    assert "has no checksums.json" in caplog.text and "unverified" in caplog.text
    assert checkpoints.completed(out)[-1].name == "step-0000006"
    assert (checkpoints.completed(out)[-1] / "checksums.json").is_file()  # new checkpoints carry them


# --- the base model, resolved once to a Hub commit -----------------------------------------------------

FIRST, SECOND = "a" * 40, "b" * 40


@pytest.fixture
def hub_base(hub, base_model, tmp_path, monkeypatch):
    """The tiny SigLIP base model served by the fake Hub as someone/tiny-siglip, main at FIRST; returns
    (the fake Hub, a function that moves main to SECOND)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    hub.serve("someone/tiny-siglip", base_model, FIRST)
    return lambda: hub.serve("someone/tiny-siglip", base_model, SECOND)


def test_the_base_models_commit_is_recorded_and_a_moved_branch_is_refused_on_resume(
        hub_base, train_synthetic, base_model, tmp_path, capsys):
    out = tmp_path / "run"

    def args(base, *extra):
        return [*train_args(train_synthetic, base_model, out, "--checkpointing-steps", "2", *extra),
                "--base-model", base]  # the last --base-model is the one taken

    results = train.main(args("someone/tiny-siglip", "--max-steps", "2"))
    recorded = {"name_or_path": "someone/tiny-siglip", "revision": None, "commit": FIRST}
    assert {k: results["provenance"]["model"][k] for k in recorded} == recorded
    saved = json.loads((out / "train_results.json").read_text())["provenance"]["model"]
    assert saved["commit"] == FIRST
    assert f"at commit `{FIRST}`" in (out / "release" / "README.md").read_text()
    position = checkpoints.read_position(checkpoints.completed(out)[-1])
    assert position["run"]["base_model"] == "someone/tiny-siglip" and position["run"]["base_commit"] == FIRST

    hub_base()  # main moves on: the same id now resolves to another commit
    message = user_error(capsys, train.main, args("someone/tiny-siglip", "--resume-from-checkpoint", "latest"))
    assert f"the commit of --base-model is '{FIRST}' in the checkpoint and '{SECOND}' now" in message, message
    assert f"--base-model someone/tiny-siglip@{FIRST}" in message

    # Pinned to the checkpoint's commit, as MODEL@REV or with --base-revision: the run goes on.
    results = train.main(args(f"someone/tiny-siglip@{FIRST}", "--resume-from-checkpoint", "latest",
                              "--max-steps", "3", "--no-export"))
    assert results["global_step"] == 3 and results["provenance"]["model"]["commit"] == FIRST
    assert results["provenance"]["model"]["revision"] == FIRST
    message = user_error(capsys, train.main, args(f"someone/tiny-siglip@{FIRST}", "--base-revision", "main",
                                                  "--resume-from-checkpoint", "latest"))
    assert f"pins the revision '{FIRST}', and the revision flag gives 'main'" in message, message


def test_a_checkpoint_without_the_base_commit_resumes_with_a_warning(run, capsys):
    args, out = run
    latest = checkpoints.completed(out)[-1]
    position = json.loads((latest / "position.json").read_text())
    del position["run"]["base_commit"]  # as an earlier version wrote it
    (latest / "position.json").write_text(json.dumps(position))
    (latest / "checksums.json").unlink()
    train.main(args("--resume-from-checkpoint", "latest", "--max-steps", "5"))
    assert "does not record the commit of --base-model" in capsys.readouterr().err
    assert checkpoints.completed(out)[-1].name == "step-0000005"
