"""How encoders run on a device: mixed precision resolved the same way in every command (CPU results and
store keys unchanged), bf16 autocast when asked, sdpa attention, and --compile reaching torch.compile."""

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nearid import IdentityScorer, models, options
from nearid.commands import evaluate
from nearid.commands import train
from nearid.numerics import resolve_precision
from nearid.scorers import SCORER_KINDS, Scorer
from nearid.store.format import fingerprint, weights_digest
from tests.helpers import random_pixels, train_args


def test_auto_precision_is_bf16_on_a_gpu_only():
    assert resolve_precision("auto", "cpu") == "no"
    assert resolve_precision("auto", "cuda:1") == resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp16", "cpu") == "fp16"
    # "auto" device: the one a run without --device gets (train.py's, evaluate.py's default)
    assert resolve_precision("auto", "auto") == resolve_precision("auto") == ("bf16" if torch.cuda.is_available()
                                                                              else "no")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_precision("fp8", "cpu")


def test_without_autocast_the_scorer_keeps_its_store_key_and_uses_sdpa(tiny_repo):
    scorer = Scorer(f"nearid:{tiny_repo}")
    assert scorer.fingerprint == fingerprint("pooled:nearid", weights_digest(scorer.model.state_dict()),
                                             scorer.processor.to_dict(), {"dtype": "torch.float32"})
    assert scorer.model.config._attn_implementation == "sdpa"
    assert scorer.provenance()["mixed_precision"] == "no"


def test_bf16_autocast_embeds_within_bf16_rounding_under_its_own_key(tiny_repo):
    exact, autocast = Scorer(f"nearid:{tiny_repo}"), Scorer(f"nearid:{tiny_repo}", mixed_precision="bf16")
    pixels = random_pixels(4)
    a, b = exact.encode(pixels), autocast.encode(pixels)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, atol=0.03, rtol=0)
    assert autocast.fingerprint != exact.fingerprint


@pytest.fixture
def compiled(monkeypatch):
    """torch.compile recorded, and still applied: the functions it is given, and dynamo's count of the graphs
    it then captured (torch._dynamo.utils.counters). The "eager" backend runs the captured graphs as they
    are: TorchDynamo traces each call as with the default backend, without the seconds of inductor's code
    generation; static shapes spare the slower symbolic trace of a second batch size."""
    import torch._dynamo

    real, seen = torch.compile, []

    def recorded(fn, **kwargs):
        seen.append(fn)
        return real(fn, **{**kwargs, "backend": "eager", "dynamic": False})

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", recorded)
    yield seen
    torch._dynamo.reset()


def captured_graphs():
    import torch._dynamo

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_evaluate_compile_flag_compiles_the_embedding(synthetic, tiny_repo, tmp_path, compiled):
    result = evaluate.main(["nearid", "--model", str(tiny_repo), "--positives", str(synthetic / "positives"),
                            "--source", f"flux={synthetic / 'flux'}", "--compile", "--cache-dir",
                            str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")])
    assert compiled == [SCORER_KINDS["nearid"].features] and result["embedding"]["images_embedded"] > 0
    assert captured_graphs() > 0  # the embedding really ran through the compiled function


def test_train_compile_flag_compiles_the_token_pass(train_synthetic, base_model, tmp_path, compiled):
    train.main(train_args(train_synthetic, base_model, tmp_path / "run", "--compile", "--max-steps", "1",
                          "--no-export"))
    assert [fn.__name__ for fn in compiled] == ["forward_features"]
    assert captured_graphs() > 0  # the token pass really ran through the compiled function


@pytest.fixture
def head_activations(monkeypatch):
    """(grad enabled, dtype) of the head's first MLP layer output at each call during a train.main run: a
    training step runs with grad, validation without."""
    seen, real = [], models.nearid_from_siglip

    def hooked(*args, **kwargs):
        model, processor = real(*args, **kwargs)
        model.head.mlp.fc1.register_forward_hook(lambda module, inputs, output: seen.append(
            (torch.is_grad_enabled(), output.dtype)))
        return model, processor

    monkeypatch.setattr(models, "nearid_from_siglip", hooked)
    return seen


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                              ("no", torch.float32)])
def test_the_head_step_and_validation_run_under_the_resolved_autocast(precision, dtype, train_synthetic, base_model,
                                                                       tmp_path, head_activations):
    train.main(train_args(train_synthetic, base_model, tmp_path / "run", "--mixed-precision", precision,
                          "--max-steps", "1", "--validation-steps", "1", "--no-export"))
    steps = {dtype for grad, dtype in head_activations if grad}
    validation = {dtype for grad, dtype in head_activations if not grad}
    assert steps == {dtype} and validation == {dtype}


def test_train_and_evaluate_resolve_the_same_precision_for_the_same_device(train_synthetic, base_model, tiny_repo,
                                                                           tmp_path, monkeypatch, head_activations):
    """A CUDA GPU this process does not train on (accelerate puts the run on the CPU) gives no autocast, as
    evaluate.py --device cpu does: the precision follows the device the run uses, not the machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto", "cpu") == "no"
    out = tmp_path / "run"
    train.main(train_args(train_synthetic, base_model, out, "--max-steps", "1", "--no-export"))
    trained = json.loads((out / "train_args.json").read_text())["mixed_precision"]
    args = options.Arguments("nearid", {"scorer": options.ScorerArguments(model=str(tiny_repo), device="cpu")})
    evaluated = options.load_scorer(args, options.process_state("cpu")).provenance()["mixed_precision"]
    assert trained == evaluated == "no"
    assert {dtype for _, dtype in head_activations} == {torch.float32}


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float32), ("no", torch.float32),
                                              ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_api_resolves_precision_as_evaluate_does_and_embeds_under_its_autocast(precision, dtype, tiny_repo,
                                                                                    tmp_path):
    """`IdentityScorer` takes evaluate.py's --mixed-precision, with its default, resolved for the same device: the
    same scorer key (the two share the embed-once store), and its embedding runs under that autocast."""
    api_default = inspect.signature(IdentityScorer).parameters["mixed_precision"].default
    assert api_default == options.ScorerArguments(model="any").mixed_precision
    api = IdentityScorer(str(tiny_repo), device="cpu", mixed_precision=precision, cache_dir=tmp_path / "cache")
    args = options.Arguments("score", {"scorer": options.ScorerArguments(model=str(tiny_repo), device="cpu",
                                                                         mixed_precision=precision)})
    evaluated = options.load_scorer(args, options.process_state("cpu"))
    assert api.scorer.mixed_precision == evaluated.mixed_precision == {"auto": "no"}.get(precision, precision)
    assert api.scorer.fingerprint == evaluated.fingerprint
    seen = []
    api.scorer.model.head.mlp.fc1.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    assert api.embed(picture).dtype == np.float32
    assert seen and set(seen) == {dtype}
