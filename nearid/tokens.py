"""Backbone tokens for training: the frozen backbone run once per image, the head trained on stored tokens.

NearID training freezes the SigLIP backbone and uses no augmentation, so an image's post-LayerNorm
patch tokens (`NearIDModel.forward_features`) are the same at every step of every epoch. They are
the "tokens" payload of the embed-once store (`nearid.store`): computed once, in one batched
no-grad pass, and read back for every step. The price is disk: 729 x 1152 values per so400m image,
1.68 MB in float16 (0.84 MB in int8).

- `BackboneTokens`: the store encoder of the tokens (fingerprint, format, pixel loader, encode).
- `TrainingImages`: the images the token store must hold (training and held-out indexes, and the
  padded slot `PAD_KEY`, an all-zero pixel tensor as in the reference).
- `CachedTokens` / `BackboneEveryStep`: head inputs for a list of image keys, from the store or
  from running the backbone on every slot at every step (the reference design, for comparison).
- `head_embeddings`, `batch_embeddings`, `embed_keys`: the head on those inputs, L2-normalised.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from nearid.images import PixelLoader
from nearid.store import StoreFormat, fingerprint, weights_digest

PAD_KEY = "pad"
HEAD_PREFIX = "backbone.vision_model.head."
AUTOCAST = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class BackboneTokens:
    """Encoder of the "tokens" payload: pixels -> `model.forward_features` (under autocast when asked)."""

    def __init__(self, model, processor, storage_dtype: str = "float16", mixed_precision: str = "no",
                 device="cpu"):
        self.model, self.device = model, device
        self.autocast = AUTOCAST[mixed_precision]
        self.loader = PixelLoader(processor)
        self.format = StoreFormat((model.config.num_patches, model.config.vision_config["hidden_size"]),
                                  storage_dtype)
        backbone = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
        # Tokens depend on the backbone weights, the preprocessing and the numeric formats only.
        self.fingerprint = fingerprint("tokens", weights_digest(backbone), processor.to_dict(),
                                       {"storage": storage_dtype, "autocast": mixed_precision})

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        device_type = torch.device(self.device).type
        autocast = torch.autocast(device_type, dtype=self.autocast) if self.autocast else nullcontext()
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast:
                return self.model.forward_features(pixels.to(self.device))
        finally:
            self.model.train(was_training)


class TrainingImages(Mapping):
    """The images to cache: `keys` read lazily from `items` (an index), plus the padded slot (None)."""

    def __init__(self, items: Mapping, keys):
        self.items, self.keys = items, [PAD_KEY, *keys]

    def __getitem__(self, key):
        return None if key == PAD_KEY else self.items[key]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


class CachedTokens:
    """Head inputs from the token store; each unique image of a batch is read once (pads cost nothing)."""

    def __init__(self, store, device):
        self.store, self.device = store, device

    def tokens(self, keys) -> tuple:
        keys = [PAD_KEY if key is None else key for key in keys]
        position = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        tokens = self.store.get(list(position), device=self.device)
        return tokens, torch.tensor([position[key] for key in keys], device=self.device)


class BackboneEveryStep:
    """Head inputs from running the frozen backbone on every slot of every sample (the reference design)."""

    def __init__(self, model, items: Mapping, loader, device):
        self.model, self.items, self.loader, self.device = model, items, loader, device

    def tokens(self, keys) -> tuple:
        pixels = torch.stack([self.loader(None if key is None else self.items[key]) for key in keys]).to(self.device)
        with torch.no_grad():
            return self.model.forward_features(pixels), torch.arange(len(keys), device=self.device)


def head_embeddings(head, provider, keys) -> torch.Tensor:
    """Image keys (None = pad) -> L2-normalised head embeddings [len(keys), D], in key order."""
    tokens, index = provider.tokens(keys)
    return F.normalize(head(tokens).float(), dim=-1)[index]


def batch_embeddings(head, provider, slots) -> torch.Tensor:
    """6-slot samples (lists of keys, None = pad) -> L2-normalised embeddings [B, 6, D]."""
    flat = [key for sample in slots for key in sample]
    return head_embeddings(head, provider, flat).view(len(slots), len(slots[0]), -1)


def embed_keys(head, provider, keys, batch_size: int = 256) -> dict:
    """{key: normalised embedding} of images through the current head (no grad; for validation)."""
    embeddings = {}
    with torch.no_grad():
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            embeddings.update(zip(chunk, head_embeddings(head, provider, chunk).cpu().numpy()))
    return embeddings
