"""NearID: identity embeddings from a frozen SigLIP vision tower and a trained attention-pooling head.

The module tree mirrors the published checkpoint so that weight names are the same when loading and
saving, whatever the transformers version:

    backbone.vision_model.embeddings.*        patch + position embeddings
    backbone.vision_model.encoder.layers.N.*  pre-LN transformer blocks
    backbone.vision_model.post_layernorm.*
    backbone.vision_model.head.*              the trained multi-head attention pooling (MAP) head

The SigLIP blocks are written out here (rather than imported from transformers) because transformers
5.x renamed the SigLIP vision modules' weights; owning the ~100 lines keeps the layout fixed.

This file imports only torch, transformers and the standard library: it is downloaded and run by
every user of the Hub repo.
"""

import math
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

try:  # loaded as Hub remote code (a package) or from a checkout (plain modules)
    from .configuration_nearid import NearIDConfig
except ImportError:
    from configuration_nearid import NearIDConfig

SUPPORTED_TRANSFORMERS = ((4, 57), (6, 0))  # [lower, upper): the releases this code runs on
SUPPORTED_TRANSFORMERS_TEXT = ">=4.57,<6"
# Releases before this one carry advisories that matter to anyone loading models by Hub id:
# GHSA-29pf-2h5f-8g72 / CVE-2026-4372 (< 5.3.0: a crafted config.json makes from_pretrained run code
# without trust_remote_code) and CVE-2026-9856 / GHSA-xrqw-3rrv-vx5w (< 5.10.0: path traversal in
# processor save_pretrained). NearID still loads on them, with a warning that suggests the releases this
# repository's commands install: 5.18 rather than 5.10, since 5.4 to 5.17 need torchvision for AutoImageProcessor.
SAFE_TRANSFORMERS = (5, 10)


def _check_transformers_version(version):
    major_minor = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= major_minor < high:
        raise ImportError(
            f"NearID supports transformers {SUPPORTED_TRANSFORMERS_TEXT}, but transformers {version} is installed. "
            f"Install a supported version: pip install 'transformers{SUPPORTED_TRANSFORMERS_TEXT}'."
        )
    if major_minor < SAFE_TRANSFORMERS:
        warnings.warn(
            f"transformers {version} is affected by GHSA-29pf-2h5f-8g72 (CVE-2026-4372: a crafted config.json can "
            "run code in from_pretrained without trust_remote_code) and CVE-2026-9856 (path traversal in processor "
            "save_pretrained). Loading models from untrusted repos with it is risky; upgrade with "
            "pip install 'transformers>=5.18,<6'.",
            UserWarning,
            stacklevel=2,
        )


_check_transformers_version(transformers.__version__)


@dataclass
class NearIDModelOutput(ModelOutput):
    """Output of [`NearIDModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, num_patches, hidden_size)`):
            Post-LayerNorm patch tokens of the backbone (729 x 1152 for so400m/14 at 384).
        pooler_output (`torch.FloatTensor` of shape `(batch, embed_dim)`):
            Raw output of the attention-pooling head (not normalised).
        image_embeds (`torch.FloatTensor` of shape `(batch, embed_dim)`):
            The identity embedding: `pooler_output`, L2-normalised when `config.normalize_embeddings`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Embedding output and the output of every encoder layer, when `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Attention weights of every encoder layer, when `output_attentions=True`.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    pooler_output: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


class NearIDVisionEmbeddings(nn.Module):
    """Non-overlapping patch embedding plus learned position embeddings (no CLS token)."""

    def __init__(self, config: NearIDConfig):
        super().__init__()
        vision = config.vision_config
        self.image_size = vision["image_size"]
        self.patch_embedding = nn.Conv2d(
            vision["num_channels"], vision["hidden_size"], kernel_size=vision["patch_size"], stride=vision["patch_size"]
        )
        # Position i belongs to patch i in row-major order, so the table is added as is (no id buffer,
        # which from_pretrained would leave uninitialised on the meta device).
        self.position_embedding = nn.Embedding(config.num_patches, vision["hidden_size"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"Expected pixel_values of shape (batch, channels, {self.image_size}, {self.image_size}), got "
                f"{tuple(pixel_values.shape)}. Preprocess images with the repo's NearIDImageProcessor "
                "(AutoImageProcessor.from_pretrained(..., trust_remote_code=True))."
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(device=weight.device, dtype=weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight


class NearIDAttention(nn.Module):
    """Multi-head self-attention; SDPA by default, an explicit softmax path for "eager" or weights."""

    def __init__(self, config: NearIDConfig):
        super().__init__()
        self.config = config
        hidden = config.vision_config["hidden_size"]
        self.num_heads = config.vision_config["num_attention_heads"]
        self.head_dim = hidden // self.num_heads
        self.dropout = config.vision_config["attention_dropout"]
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        batch, length, hidden = hidden_states.shape
        q = self._split_heads(self.q_proj(hidden_states))
        k = self._split_heads(self.k_proj(hidden_states))
        v = self._split_heads(self.v_proj(hidden_states))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions or self.config._attn_implementation == "eager":
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            # Softmax in fp32 as SigLIP does, so fp16/bf16 agree with fp32 to rounding.
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            context = torch.matmul(F.dropout(weights, p=dropout, training=self.training), v)
        else:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(batch, length, hidden)
        return self.out_proj(context), (weights if output_attentions else None)


class NearIDMLP(nn.Module):
    def __init__(self, config: NearIDConfig):
        super().__init__()
        vision = config.vision_config
        self.activation_fn = ACT2FN[vision["hidden_act"]]
        self.fc1 = nn.Linear(vision["hidden_size"], vision["intermediate_size"])
        self.fc2 = nn.Linear(vision["intermediate_size"], vision["hidden_size"])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class NearIDEncoderLayer(nn.Module):
    def __init__(self, config: NearIDConfig):
        super().__init__()
        hidden, eps = config.vision_config["hidden_size"], config.vision_config["layer_norm_eps"]
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = NearIDAttention(config)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = NearIDMLP(config)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        attended, weights = self.self_attn(self.layer_norm1(hidden_states), output_attentions)
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states))
        return hidden_states, weights


class NearIDEncoder(nn.Module):
    def __init__(self, config: NearIDConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            NearIDEncoderLayer(config) for _ in range(config.vision_config["num_hidden_layers"])
        )

    def forward(self, hidden_states, output_hidden_states=False, output_attentions=False):
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, output_attentions)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return hidden_states, all_hidden, all_attentions


class NearIDAttentionPoolingHead(nn.Module):
    """SigLIP's multi-head attention pooling: one learned probe attends over the patch tokens.

    The parameters live in an `nn.MultiheadAttention` so that their names match SigLIP's head
    (`attention.in_proj_weight`, `attention.out_proj.weight`, ...). The forward does not call that
    module: with a single query, the key projection can be folded into the probe and the value
    projection applied after pooling, so the head reads the tokens twice instead of projecting all
    of them (about 0.06 instead of 3.9 GFLOP per so400m image). The result is the same function.
    """

    def __init__(self, config: NearIDConfig):
        super().__init__()
        hidden = config.vision_config["hidden_size"]
        self.num_heads = config.vision_config["num_attention_heads"]
        self.probe = nn.Parameter(torch.randn(1, 1, hidden))
        self.attention = nn.MultiheadAttention(hidden, self.num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(hidden, eps=config.vision_config["layer_norm_eps"])
        self.mlp = NearIDMLP(config)

    def attention_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, D] -> the probe's attention on each token, per head [B, T, H] (sums to 1 over T)."""
        hidden, heads = tokens.shape[-1], self.num_heads
        head_dim = hidden // heads
        w_q, w_k, _ = self.attention.in_proj_weight.chunk(3)
        b_q = self.attention.in_proj_bias.chunk(3)[0]  # the key bias shifts all scores equally
        query = (self.probe.reshape(hidden) @ w_q.t() + b_q).view(heads, head_dim)
        # Fold the key projection into the query: score_t = tokens_t . (W_k,h^T q_h) / sqrt(d_h).
        folded_query = torch.einsum("hc,hcd->hd", query, w_k.view(heads, head_dim, hidden)) / math.sqrt(head_dim)
        scores = tokens @ folded_query.t().to(tokens.dtype)  # [B, T, H]
        # Softmax in float32 at least, so half precision agrees with float32 and float64 stays exact.
        return F.softmax(scores, dim=1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(tokens.dtype)

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, D] -> attention output of the probe [B, D] (before out_proj)."""
        hidden, heads = tokens.shape[-1], self.num_heads
        head_dim = hidden // heads
        w_v = self.attention.in_proj_weight.chunk(3)[2]
        b_v = self.attention.in_proj_bias.chunk(3)[2]
        weights = self.attention_weights(tokens)
        pooled = torch.einsum("bth,btd->bhd", weights, tokens)  # [B, H, D]
        # Softmax weights sum to 1, so the value projection commutes with the pooling.
        values = torch.einsum("bhd,hcd->bhc", pooled, w_v.view(heads, head_dim, hidden).to(tokens.dtype))
        return (values + b_v.view(heads, head_dim).to(tokens.dtype)).reshape(tokens.shape[0], hidden)

    def attention_output(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, D] -> the attention stage's output o [B, D], before the MLP and its residual."""
        return self.attention.out_proj(self._pool(tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, D] -> pooled embedding [B, D] (not normalised)."""
        hidden_state = self.attention_output(tokens)
        return hidden_state + self.mlp(self.layernorm(hidden_state))


class NearIDVisionTransformer(nn.Module):
    """The SigLIP vision tower with its pooling head, under the published `vision_model` name."""

    def __init__(self, config: NearIDConfig):
        super().__init__()
        self.embeddings = NearIDVisionEmbeddings(config)
        self.encoder = NearIDEncoder(config)
        self.post_layernorm = nn.LayerNorm(
            config.vision_config["hidden_size"], eps=config.vision_config["layer_norm_eps"]
        )
        self.head = NearIDAttentionPoolingHead(config)


class NearIDBackbone(nn.Module):
    """Holds the tower as `vision_model`, giving the published `backbone.vision_model.*` key prefix."""

    def __init__(self, config: NearIDConfig):
        super().__init__()
        self.vision_model = NearIDVisionTransformer(config)


class NearIDPreTrainedModel(PreTrainedModel):
    config_class = NearIDConfig
    base_model_prefix = "nearid"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["NearIDEncoderLayer", "NearIDAttentionPoolingHead"]

    @classmethod
    def from_pretrained(cls, *args, output_loading_info=False, **kwargs):
        """transformers' `from_pretrained`, strict: the published layout is exact, so a checkpoint with
        missing, unexpected or mis-shaped weights is an error naming them, never a partly random model."""
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {name: sorted(map(str, info.get(key) or ())) for name, key in
                    (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                     ("mis-shaped", "mismatched_keys"))}
        if any(problems.values()):
            found = "; ".join(f"{name}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                              for name, keys in problems.items() if keys)
            raise ValueError(
                f"The checkpoint does not match the NearID weight layout ({found}). NearID checkpoints hold exactly "
                "the backbone.vision_model.* weights of the published layout; re-export the model with "
                "nearid.hub.export_hub_folder, or fix the weight names."
            )
        return (model, info) if output_loading_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        """SigLIP's initialisation, for models built from a config (weights normally come from a checkpoint).

        Every parameter has a rule here, whichever module transformers hands in (the tower's embeddings
        module or the position-embedding table itself), so no parameter is ever left uninitialised.
        """
        if isinstance(module, NearIDVisionEmbeddings):
            nn.init.normal_(module.position_embedding.weight, std=module.position_embedding.weight.shape[1] ** -0.5)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5)
        elif isinstance(module, NearIDAttentionPoolingHead):
            nn.init.xavier_uniform_(module.probe)
            nn.init.xavier_uniform_(module.attention.in_proj_weight)
            nn.init.zeros_(module.attention.in_proj_bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.xavier_uniform_(module.in_proj_weight)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class NearIDModel(NearIDPreTrainedModel):
    """Identity embedding model: frozen SigLIP tower (`forward_features`) + MAP head (`forward_head`).

    Example:

    ```python
    >>> model = AutoModel.from_pretrained("Aleksandar/nearid-siglip2", trust_remote_code=True)
    >>> processor = AutoImageProcessor.from_pretrained("Aleksandar/nearid-siglip2", trust_remote_code=True)
    >>> embeds = model.get_image_features(**processor([image_a, image_b], return_tensors="pt"))
    >>> identity_score = embeds[0] @ embeds[1]  # cosine similarity
    ```
    """

    def __init__(self, config: NearIDConfig):
        super().__init__(config)
        self.backbone = NearIDBackbone(config)
        self.post_init()

    @property
    def vision_model(self) -> NearIDVisionTransformer:
        return self.backbone.vision_model

    @property
    def head(self) -> NearIDAttentionPoolingHead:
        return self.backbone.vision_model.head

    def freeze_backbone(self, freeze: bool = True):
        """Stop (or restart) gradients through everything but the pooling head, as NearID training does."""
        for name, parameter in self.named_parameters():
            if not name.startswith("backbone.vision_model.head."):
                parameter.requires_grad_(not freeze)
        return self

    def _encode(self, pixel_values, output_hidden_states=False, output_attentions=False):
        tower = self.vision_model
        hidden = tower.embeddings(pixel_values)
        hidden, all_hidden, all_attentions = tower.encoder(hidden, output_hidden_states, output_attentions)
        return tower.post_layernorm(hidden), all_hidden, all_attentions

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> post-LayerNorm patch tokens [B, num_patches, hidden_size].

        The backbone is frozen in NearID, so these tokens can be computed once and cached for
        evaluation and training; `forward_head` turns them into embeddings.
        """
        return self._encode(pixel_values)[0]

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, num_patches, hidden_size] -> raw head output [B, embed_dim] (not normalised)."""
        return self.head(tokens)

    def get_image_features(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> identity embeddings [B, embed_dim]; L2-normalised unless normalize=False."""
        pooled = self.forward_head(self.forward_features(pixel_values))
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        tokens, all_hidden, all_attentions = self._encode(pixel_values, output_hidden_states, output_attentions)
        pooled = self.forward_head(tokens)
        embeds = F.normalize(pooled, dim=-1) if self.config.normalize_embeddings else pooled
        output = NearIDModelOutput(
            last_hidden_state=tokens,
            pooler_output=pooled,
            image_embeds=embeds,
            hidden_states=all_hidden,
            attentions=all_attentions,
        )
        return output if return_dict else output.to_tuple()

    @classmethod
    def from_siglip(cls, siglip, **from_pretrained_kwargs):
        """Build an untrained NearID model from a SigLIP / SigLIP2 (fixed resolution) checkpoint.

        `siglip` is a Hub id or local folder of a full SigLIP model or a vision-only one, or an already
        loaded `SiglipModel` / `SiglipVisionModel`. The tower and its pretrained MAP head are copied, so
        before training the NearID embedding equals SigLIP's own (normalised) image embedding. Extra
        keyword arguments (revision, cache_dir, token, dtype, ...) go to `from_pretrained`.
        """
        source = siglip if isinstance(siglip, nn.Module) else _load_siglip_vision(siglip, **from_pretrained_kwargs)
        vision_config = getattr(source.config, "vision_config", source.config)
        if not getattr(vision_config, "vision_use_head", True):
            raise ValueError("This SigLIP checkpoint has no attention-pooling head (vision_use_head=false) to start from.")
        config = NearIDConfig(vision_config=vision_config, embed_dim=vision_config.hidden_size)
        model = cls(config)
        model.vision_model.load_state_dict(_siglip_vision_state_dict(source), strict=True)
        return model.to(next(source.parameters()).dtype)


def _load_siglip_vision(name_or_path, **kwargs):
    """Load only the vision tower of a SigLIP checkpoint (full model or vision-only), Hub id or folder."""
    from transformers import AutoConfig, SiglipVisionModel

    config_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    model_type = AutoConfig.from_pretrained(name_or_path, **config_kwargs).model_type
    if model_type not in ("siglip", "siglip_vision_model"):
        raise ValueError(
            f"{name_or_path} is a '{model_type}' checkpoint; NearID starts from a fixed-resolution SigLIP or SigLIP2 "
            "checkpoint (model_type 'siglip' or 'siglip_vision_model'), e.g. google/siglip2-so400m-patch14-384. "
            "NaFlex SigLIP2 checkpoints ('siglip2') use a different patch embedding and are not supported."
        )
    return SiglipVisionModel.from_pretrained(name_or_path, **kwargs)


def _siglip_vision_state_dict(module: nn.Module) -> dict:
    """State dict of a SiglipModel / SiglipVisionModel with the names our `vision_model` uses.

    transformers 4.x nests the tower as `vision_model.*` inside SiglipVisionModel, 5.x does not;
    SiglipModel has it under `vision_model.*` in both. Strip that level and drop the text tower.
    """
    state = {}
    for key, value in module.state_dict().items():
        if key.startswith("text_model.") or key in ("logit_scale", "logit_bias"):
            continue
        state[key.removeprefix("vision_model.")] = value
    state.pop("embeddings.position_ids", None)
    return state


__all__ = ["NearIDModel", "NearIDPreTrainedModel", "NearIDModelOutput"]
