"""Main job: build a small NearID repo from a tiny SigLIP, load it as users do, and score images.

Everything runs locally on the CPU in seconds and nothing is downloaded:
  1. a tiny random SigLIP vision model is saved as a local checkpoint (stand-in for
     google/siglip2-so400m-patch14-384),
  2. NearIDModel.from_siglip copies its tower and MAP head, and the result is exported as a
     complete Hub repo folder (fp16 safetensors, configs, remote code),
  3. that folder is loaded through AutoModel / AutoImageProcessor with trust_remote_code=True,
  4. a few drawn images are embedded and their identity scores (cosine similarities) printed.
The tiny model is untrained, so the scores only show the plumbing, not NearID's accuracy.

Usage: python demo.py [--output-dir demo_outputs]
"""

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from image_processing_nearid import NearIDImageProcessor
from modeling_nearid import NearIDModel
from nearid_hub import export_hub_folder

TINY_SIGLIP = dict(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def save_tiny_siglip(folder: Path) -> Path:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).save_pretrained(folder)
    return folder


def draw_object(body, stripe, shift=0, size=128, background=(40, 90, 160)):
    """A toy 'object': a coloured disc with a stripe, on a fixed background; `shift` moves the view."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    box = (30 + shift, 30 + shift // 2, 98 + shift, 98 + shift // 2)
    draw.ellipse(box, fill=body)
    draw.rectangle((box[0] + 10, box[1] + 30, box[2] - 10, box[1] + 40), fill=stripe)
    return image


def demo_images():
    return {
        "mug view 1": draw_object((200, 60, 50), (250, 250, 250)),
        "mug view 2": draw_object((200, 60, 50), (250, 250, 250), shift=12),
        "near-identity distractor": draw_object((200, 60, 50), (20, 20, 20)),
        "other object": draw_object((60, 180, 70), (250, 200, 0), shift=6),
    }


def print_similarities(names, embeddings):
    scores = embeddings @ embeddings.t()
    width = max(len(n) for n in names)
    print(" " * width + "  " + "  ".join(f"{i:>6d}" for i in range(len(names))))
    for i, name in enumerate(names):
        print(f"{name:>{width}}  " + "  ".join(f"{s:6.3f}" for s in scores[i].tolist()) + f"   [{i}]")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_outputs", help="where the demo writes its checkpoints")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)

    siglip_folder = save_tiny_siglip(out / "tiny-siglip")
    model = NearIDModel.from_siglip(str(siglip_folder))
    processor = NearIDImageProcessor(size={"height": 64, "width": 64}, resample=2)
    repo = export_hub_folder(model, processor, out / "nearid-tiny", overwrite=True)
    print(f"Exported a NearID Hub repo folder: {repo} ({', '.join(sorted(p.name for p in repo.iterdir()))})")

    from transformers import AutoImageProcessor, AutoModel

    loaded = AutoModel.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32).eval()
    loaded_processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
    images = demo_images()
    with torch.no_grad():
        pixels = loaded_processor(list(images.values()), return_tensors="pt")["pixel_values"]
        embeddings = loaded.get_image_features(pixels)
    print(f"Embedded {len(images)} images -> {tuple(embeddings.shape)}; identity scores (cosine):")
    print_similarities(list(images), embeddings)
    print("(untrained tiny model: the numbers show the pipeline, not NearID's accuracy)")


if __name__ == "__main__":
    main()
