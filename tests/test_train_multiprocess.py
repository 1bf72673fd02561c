"""train.py launched as users launch it: two processes give one process's run; mixed precision on the CPU.

Multi-process runs go through `python -m torch.distributed.run` on the CPU (gloo), as in
test_evaluate_multiprocess.py (`accelerate launch --cpu` would start a single process). The compared
two-process run is the first run of conftest.py's `two_process_launch` (tests/commands_worker.py), which
goes on with test_evaluate_multiprocess.py's runs in the same processes and ends with one that stops them on
purpose: it is judged by the runs each process records as returned and by the files it writes
(train_results.json here, its checkpoints below), then by each process's exit status. The resumed run is a
launch of its own, judged by its files and its exit code: 0, or the known abort at exit (CPU process groups
are sometimes killed by a signal at exit after the work is done, see `helpers.assert_finished`).
"""

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nearid.commands import train
from nearid import checkpoints
from tests.commands_worker import train_run_args
from tests.helpers import REPO_ROOT, assert_finished, launch, logged_losses, single_threaded, train_args

# The compared run (tests/commands_worker.py's `train_run_args`) keeps the newest 3 of its checkpoints: steps 9, 12
# and 14. Step 9, mid-epoch, is where the resume test continues the two-process run from.
KEPT = ["step-0000009", "step-0000012", "step-0000014"]


def launch_train(num_processes, train_synthetic, base_model, out, *extra):
    """train.py on `num_processes` CPU processes sharing one global batch; returns the launcher's output."""
    args = [REPO_ROOT / "train.py", *train_run_args(train_synthetic, base_model, out, num_processes, *extra)]
    code, output = launch(num_processes, args, out.parent, f"{out.name}.log")
    assert_finished(code, output, (out / "train_results.json").is_file())
    return output


@pytest.fixture(scope="module")
def runs(train_synthetic, base_model, two_process_launch, tmp_path_factory):
    """{number of processes: (output folder, launcher output or None)} of the same run on one process (this
    one) and on two (the first run of conftest.py's `two_process_launch`, whose output the later runs share)."""
    one = tmp_path_factory.mktemp("runs") / "processes1"
    with single_threaded():  # this process as the 1-process run
        train.main(train_run_args(train_synthetic, base_model, one, 1))
    return {1: (one, None), 2: (two_process_launch["out"] / "train", two_process_launch["output"])}


def assert_close_weights(a, b, rtol=0.0, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=rtol, atol=atol, msg=name)


def cache_index(out):
    [store] = [p for p in (out / "token_cache").iterdir() if p.is_dir()]  # the one store of the run's fingerprint
    return json.loads((store / "index.json").read_text())


def test_two_processes_train_like_one(runs):
    (one, _), (two, _) = runs[1], runs[2]
    one_losses, two_losses = logged_losses(one), logged_losses(two)
    results = json.loads((two / "train_results.json").read_text())
    assert results["arguments"]["num_processes"] == 2
    assert [step for step, _ in two_losses] == list(range(1, results["global_step"] + 1))  # logged once per step
    assert [step for step, _ in one_losses] == [step for step, _ in two_losses]
    for (step, expected), (_, loss) in zip(one_losses, two_losses):
        assert loss == pytest.approx(expected, rel=1e-5), f"step {step}"

    saved = [p.name for p in checkpoints.completed(two)]
    assert saved == [p.name for p in checkpoints.completed(one)] == KEPT
    for name in saved:
        assert_close_weights(load_file(one / "checkpoints" / name / "head.safetensors"),
                             load_file(two / "checkpoints" / name / "head.safetensors"))
    # The release is float16: one rounding step apart at most.
    assert_close_weights(load_file(one / "release" / "model.safetensors"),
                         load_file(two / "release" / "model.safetensors"), rtol=1e-3)

    single = json.loads((one / "train_results.json").read_text())
    assert results["final"]["pooled"] == pytest.approx(single["final"]["pooled"], abs=1e-5)
    assert results["data"] == single["data"]


def test_two_processes_share_the_token_cache_and_write_outputs_once(runs):
    (one, _), (two, output) = runs[1], runs[2]
    shards = cache_index(two)["shards"]
    assert sorted(shard["file"].split("-")[1] for shard in shards) == ["p000", "p001"]  # each process built a share
    keys = [key for shard in shards for key in shard["keys"]]
    assert len(keys) == len(set(keys))  # no image computed twice
    assert set(keys) == {key for shard in cache_index(one)["shards"] for key in shard["keys"]}

    assert output.count("exported ") == 1 and output.count("training data: ") == 1  # only the main process prints
    final_logs = [json.loads(line) for line in (two / "logs.jsonl").read_text().splitlines()]
    assert sum("config" in line for line in final_logs) == 1
    assert sum("test/ssr" in line for line in final_logs) == 1


def poison_losses_after(log, step):
    """The copied log's losses after `step` set to -1: they match the full run's only if the resumed run
    drops them and logs those steps itself."""
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    lines = [{**line, "loss": -1.0} if "loss" in line and line["step"] > step else line for line in lines]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_two_processes_resume_to_the_same_weights(runs, train_synthetic, base_model, tmp_path):
    """A two-process run continued from step 9 of a two-process run ends where the uninterrupted one did.

    The folder it continues is the fixture's two-process run cut back to what it held after step 9: its
    checkpoints after step 9 and its results removed, and the losses it logged after step 9 made wrong (the
    resumed run must trim the log and log those steps again). That step-9
    checkpoint is the one a run stopped at step 9 writes: the same step, saved the same way, and nothing after
    step 9 goes into it."""
    full, _ = runs[2]
    out = shutil.copytree(full, tmp_path / "resumed")
    for later in checkpoints.completed(out)[KEPT.index("step-0000009") + 1:]:
        shutil.rmtree(later)
    (out / "train_results.json").unlink()
    poison_losses_after(out / "logs.jsonl", 9)
    assert [p.name for p in checkpoints.completed(out)] == ["step-0000009"]
    output = launch_train(2, train_synthetic, base_model, out, "--resume-from-checkpoint", "latest")
    assert re.search(r"resumed from \S+step-0000009 at step 9\n", output), output[-4000:]

    for name in KEPT[1:]:  # written again by the resumed run
        a, b = (load_file(run / "checkpoints" / name / "head.safetensors") for run in (full, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert logged_losses(out) == logged_losses(full)  # steps 10 to 14 trimmed, then logged again with the same losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu(precision, runs, train_synthetic, base_model, tmp_path):
    """A few autocast steps: finite losses close to the float32 run's, and a checkpoint."""
    out = tmp_path / precision
    train.main(train_args(train_synthetic, base_model, out, "--mixed-precision", precision, "--max-steps", "3",
                          "--no-export"))
    losses, reference = logged_losses(out), logged_losses(runs[1][0])[:3]
    assert [step for step, _ in losses] == [1, 2, 3]
    for (step, loss), (_, expected) in zip(losses, reference):
        assert math.isfinite(loss) and loss == pytest.approx(expected, rel=0.03), f"step {step}"
    assert [p.name for p in checkpoints.completed(out)] == ["step-0000003"]
