"""so400m forward throughput: images/s, and the share of this machine's matmul rate it reaches.

Random weights (no download). Prints, in one run:
  - the measured fp32 matmul rate on the encoder's own GEMM shapes,
  - NearID's forward images/s and achieved FLOP/s as a fraction of that rate,
  - transformers' SiglipVisionModel on the same weights, as a ratio.
With CUDA available it also measures bf16 at a large batch.

Usage: python benchmarks/bench_forward.py [--batch 4] [--repeats 3]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import best_time, environment_lines, write_results  # noqa: E402

from configuration_nearid import NearIDConfig  # noqa: E402
from modeling_nearid import NearIDModel  # noqa: E402


def forward_flops(config: NearIDConfig) -> float:
    """Multiply-adds x 2 of one image through the tower (the folded head is negligible and left out)."""
    v = config.vision_config
    tokens, width, mlp = config.num_patches, v["hidden_size"], v["intermediate_size"]
    patch = 2 * tokens * width * v["num_channels"] * v["patch_size"] ** 2
    per_layer = 2 * tokens * width * width * 4 + 2 * 2 * tokens * tokens * width + 2 * 2 * tokens * width * mlp
    return patch + v["num_hidden_layers"] * per_layer


def matmul_rate(tokens, width, mlp, device, dtype, repeats):
    """FLOP/s of the encoder's two big GEMM shapes (QKV-like and MLP-like), averaged."""
    rates = []
    for k, n in ((width, width), (width, mlp), (mlp, width)):
        a = torch.randn(tokens, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        seconds = best_time(lambda: a @ b, repeats)
        rates.append(2 * tokens * k * n / seconds)
    return sum(rates) / len(rates)


def transformers_siglip(model: NearIDModel):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    siglip = SiglipVisionModel(SiglipVisionConfig(**model.config.vision_config, vision_use_head=True))
    state = {k.removeprefix("backbone.vision_model."): v for k, v in model.state_dict().items()}
    tower = getattr(siglip, "vision_model", siglip)
    tower.load_state_dict(state, strict=False)
    return siglip.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--gpu-batch", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "forward.txt"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = NearIDConfig()
    model = NearIDModel(config).eval()
    flops = forward_flops(config)
    lines = environment_lines() + [f"so400m forward: {flops / 1e9:.0f} GFLOP/image (tower; head folded)"]

    pixels = torch.randn(args.batch, 3, 384, 384)
    with torch.inference_mode():
        rate = matmul_rate(args.batch * config.num_patches, 1152, 4304, "cpu", torch.float32, args.repeats)
        ours = best_time(lambda: model(pixels), args.repeats)
        reference = transformers_siglip(model)
        theirs = best_time(lambda: reference(pixel_values=pixels), args.repeats)
    achieved = flops * args.batch / ours
    lines += [
        f"CPU fp32 matmul rate (encoder GEMM shapes): {rate / 1e9:.1f} GFLOP/s",
        f"NearID fp32 sdpa, batch {args.batch}: {args.batch / ours:.3f} images/s, "
        f"{achieved / 1e9:.1f} GFLOP/s = {achieved / rate:.1%} of the matmul rate",
        f"transformers SiglipVisionModel fp32 sdpa, same weights: {args.batch / theirs:.3f} images/s",
        f"ratio NearID / transformers SigLIP: {theirs / ours:.2f}x",
    ]
    if torch.cuda.is_available():
        lines += gpu_lines(model, flops, args)
    else:
        lines.append("GPU: none on this machine; bf16 GPU throughput not measured in this run.")
    write_results(args.output, lines)


def gpu_lines(model, flops, args):
    model = model.to("cuda", torch.bfloat16)
    pixels = torch.randn(args.gpu_batch, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        seconds = best_time(lambda: model(pixels), args.repeats)
        rate = matmul_rate(args.gpu_batch * 729, 1152, 4304, "cuda", torch.bfloat16, args.repeats)
    achieved = flops * args.gpu_batch / seconds
    return [
        f"GPU: {torch.cuda.get_device_name()}",
        f"GPU bf16 matmul rate: {rate / 1e12:.0f} TFLOP/s",
        f"NearID bf16 sdpa, batch {args.gpu_batch}: {args.gpu_batch / seconds:.0f} images/s, "
        f"{achieved / 1e12:.0f} TFLOP/s = {achieved / rate:.1%} of the matmul rate",
    ]


if __name__ == "__main__":
    main()
