"""Configuration of NearID: a frozen SigLIP vision tower plus a trained attention-pooling head."""

from transformers import PretrainedConfig

# SigLIP2 so400m/14 at 384 px, the fixed-resolution "siglip" architecture NearID is trained on.
SO400M_VISION_DEFAULTS = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}

_POSITIVE_INTS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
)
# Activations the published SigLIP checkpoints use; the model maps these names to functions.
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "quick_gelu", "relu")


def _vision_numbers(vision_config):
    """Fill in so400m defaults and keep only the numbers the NearID backbone uses.

    Accepts a plain dict (as stored in config.json) or a transformers config object such as
    `SiglipVisionConfig`. Extra keys (e.g. `model_type`, `vision_use_head`) are dropped so that the
    saved config stays a plain dict of the architecture numbers.
    """
    if vision_config is None:
        given = {}
    elif isinstance(vision_config, dict):
        given = vision_config
    elif hasattr(vision_config, "to_dict"):
        given = vision_config.to_dict()
    else:
        raise ValueError(
            f"vision_config must be a dict of SigLIP vision numbers or a SiglipVisionConfig, "
            f"got {type(vision_config).__name__}."
        )
    return {key: given.get(key, default) for key, default in SO400M_VISION_DEFAULTS.items()}


def _validate_vision(vision):
    for key in _POSITIVE_INTS:
        value = vision[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"vision_config['{key}'] must be a positive integer, got {value!r}.")
    if vision["hidden_size"] % vision["num_attention_heads"]:
        raise ValueError(
            f"vision_config['hidden_size'] ({vision['hidden_size']}) must be divisible by "
            f"vision_config['num_attention_heads'] ({vision['num_attention_heads']})."
        )
    if vision["image_size"] < vision["patch_size"]:
        raise ValueError(
            f"vision_config['image_size'] ({vision['image_size']}) must be at least "
            f"vision_config['patch_size'] ({vision['patch_size']})."
        )
    if vision["hidden_act"] not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"vision_config['hidden_act'] must be one of {SUPPORTED_ACTIVATIONS}, got {vision['hidden_act']!r}."
        )
    eps = vision["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"vision_config['layer_norm_eps'] must be a positive number, got {eps!r}.")
    dropout = vision["attention_dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"vision_config['attention_dropout'] must be in [0, 1), got {dropout!r}.")


class NearIDConfig(PretrainedConfig):
    """Configuration for [`NearIDModel`].

    Args:
        vision_config (`dict` or `SiglipVisionConfig`, *optional*):
            Numbers of the SigLIP vision tower (hidden_size, intermediate_size, num_hidden_layers,
            num_attention_heads, num_channels, image_size, patch_size, hidden_act, layer_norm_eps,
            attention_dropout). Missing numbers default to SigLIP2 so400m/14 at 384 px.
        embed_dim (`int`, *optional*, defaults to 1152):
            Size of the identity embedding. The attention-pooling head keeps the tower's width, so this
            must equal `vision_config["hidden_size"]`.
        normalize_embeddings (`bool`, *optional*, defaults to `True`):
            Whether `image_embeds` in the model output is L2-normalised (cosine similarity = dot product).
    """

    model_type = "nearid"

    def __init__(self, vision_config=None, embed_dim=1152, normalize_embeddings=True, **kwargs):
        vision = _vision_numbers(vision_config)
        _validate_vision(vision)
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive integer, got {embed_dim!r}.")
        if embed_dim != vision["hidden_size"]:
            raise ValueError(
                f"embed_dim ({embed_dim}) must equal vision_config['hidden_size'] ({vision['hidden_size']}): "
                "the attention-pooling head outputs one token of the tower's width. Set both to the same value."
            )
        if not isinstance(normalize_embeddings, bool):
            raise ValueError(f"normalize_embeddings must be true or false, got {normalize_embeddings!r}.")
        self.vision_config = vision
        self.embed_dim = embed_dim
        self.normalize_embeddings = normalize_embeddings
        super().__init__(**kwargs)

    @property
    def num_patches(self):
        """Patch tokens per image (27 x 27 = 729 for so400m/14 at 384)."""
        return (self.vision_config["image_size"] // self.vision_config["patch_size"]) ** 2

    @property
    def token_shape(self):
        """(patch tokens, width) of one image's backbone output: what the head reads (729 x 1152 for so400m/14)."""
        return self.num_patches, self.vision_config["hidden_size"]


__all__ = ["NearIDConfig"]
