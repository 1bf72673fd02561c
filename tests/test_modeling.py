"""NearIDModel: checkpoint layout, equivalence with SigLIP, the split forward, dtypes and freezing."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import modeling_nearid
from configuration_nearid import NearIDConfig
from modeling_nearid import NearIDModel
from tests.helpers import TINY_VISION, make_tiny_siglip, random_pixels, siglip_tower

PUBLISHED_HEAD_KEYS = {
    "probe",
    "attention.in_proj_weight",
    "attention.in_proj_bias",
    "attention.out_proj.weight",
    "attention.out_proj.bias",
    "layernorm.weight",
    "layernorm.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
}


def siglip_embedding(siglip, pixels):
    with torch.no_grad():
        return F.normalize(siglip(pixel_values=pixels).pooler_output, dim=-1)


def siglip_tower_state(siglip):
    """SigLIP vision weights named as under `vision_model.` (4.x nests them, 5.x does not)."""
    return {k.removeprefix("vision_model."): v for k, v in siglip.state_dict().items() if "position_ids" not in k}


def published_layout(siglip_config):
    """The published modeling code's module tree: `backbone.vision_model` = transformers' SigLIP tower."""
    from transformers import SiglipVisionModel

    tower = SiglipVisionModel(siglip_config)
    if hasattr(tower, "vision_model"):  # transformers 4.x: SiglipVisionModel.vision_model is the tower
        root = nn.Module()
        root.backbone = tower
        return root, tower.vision_model
    root = nn.Module()
    root.backbone = nn.Module()
    root.backbone.vision_model = tower
    return root, tower


def write_published_checkpoint(folder, siglip):
    """A checkpoint as published: fp16 safetensors, `backbone.vision_model.*` keys, NearID config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"backbone.vision_model.{k}": v.half().contiguous() for k, v in siglip_tower_state(siglip).items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = NearIDConfig(vision_config=TINY_VISION, embed_dim=TINY_VISION["hidden_size"]).to_dict()
    config["architectures"] = ["NearIDModel"]
    (folder / "config.json").write_text(json.dumps(config))
    return state


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(embed_dim=64), r"embed_dim \(64\) must equal"),
        (dict(vision_config={"hidden_size": 30, "num_attention_heads": 4}, embed_dim=30), "divisible"),
        (dict(vision_config={"num_hidden_layers": 0}), "num_hidden_layers"),
        (dict(vision_config={"patch_size": 2.5}), "patch_size"),
        (dict(vision_config={"hidden_act": "swish_magic"}), "hidden_act"),
        (dict(vision_config={"layer_norm_eps": -1.0}), "layer_norm_eps"),
        (dict(normalize_embeddings="yes"), "normalize_embeddings"),
        (dict(vision_config=[1, 2]), "vision_config must be a dict"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NearIDConfig(**kwargs)


def test_config_defaults_are_so400m_and_round_trip(tmp_path):
    config = NearIDConfig()
    assert config.vision_config["hidden_size"] == 1152 and config.vision_config["num_hidden_layers"] == 27
    assert config.num_patches == 729 and config.embed_dim == 1152 and config.normalize_embeddings is True
    assert config.token_shape == (729, 1152)  # what the token store holds per image
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "nearid" and isinstance(saved["vision_config"], dict)
    assert NearIDConfig.from_pretrained(tmp_path).vision_config == config.vision_config


def test_root_config_json_is_so400m_with_auto_map():
    from tests.helpers import REPO_ROOT

    saved = json.loads((REPO_ROOT / "config.json").read_text())
    assert saved["architectures"] == ["NearIDModel"]
    assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", "AutoImageProcessor"}
    assert NearIDConfig(**{k: v for k, v in saved.items() if k != "auto_map"}).vision_config == NearIDConfig().vision_config


def test_unsupported_transformers_version_fails_naming_the_range():
    modeling_nearid._check_transformers_version("5.23.0")
    for version in ("4.40.2", "6.0.0", "3.5.1"):
        with pytest.raises(ImportError, match=r">=4\.57,<6"):
            modeling_nearid._check_transformers_version(version)


def test_releases_with_loading_advisories_still_load_but_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modeling_nearid._check_transformers_version("5.10.1")
    for version in ("4.57.6", "5.2.0", "5.9.0"):
        with pytest.warns(UserWarning, match=r"CVE-2026-4372.*CVE-2026-9856.*transformers>=5\.18"):
            modeling_nearid._check_transformers_version(version)


# --- checkpoint layout ---------------------------------------------------------------------------


def test_so400m_key_layout_matches_published_checkpoint():
    with torch.device("meta"):
        model = NearIDModel(NearIDConfig())
    keys = list(model.state_dict())
    assert len(keys) == 448
    assert all(k.startswith("backbone.vision_model.") for k in keys)
    head = {k.removeprefix("backbone.vision_model.head.") for k in keys if ".head." in k}
    assert head == PUBLISHED_HEAD_KEYS
    assert "backbone.vision_model.encoder.layers.26.mlp.fc2.weight" in keys
    assert "backbone.vision_model.post_layernorm.weight" in keys


def test_published_fp16_checkpoint_loads_without_missing_keys(tmp_path):
    siglip = make_tiny_siglip()
    write_published_checkpoint(tmp_path, siglip)
    model, info = NearIDModel.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float32)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set())
    assert model.dtype == torch.float32
    reference = make_tiny_siglip()
    reference.load_state_dict({k: v.half().float() for k, v in siglip.state_dict().items()})
    pixels = random_pixels()
    with torch.no_grad():
        embeds = model.eval()(pixels).image_embeds
    torch.testing.assert_close(embeds, siglip_embedding(reference, pixels), atol=1e-5, rtol=1e-5)


def test_save_reload_round_trip_is_exact_and_keeps_published_names(tmp_path, tiny_nearid, pixels):
    tiny_nearid.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())
    assert saved_keys == set(tiny_nearid.state_dict())
    assert all(k.startswith("backbone.vision_model.") for k in saved_keys)
    reloaded = NearIDModel.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(tiny_nearid.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).image_embeds, tiny_nearid(pixels).image_embeds, atol=1e-6, rtol=0)


def test_our_checkpoint_loads_strictly_into_published_module_layout(tmp_path, tiny_nearid, pixels):
    from safetensors.torch import load_file

    tiny_nearid.save_pretrained(tmp_path)
    siglip_config = make_tiny_siglip().config
    root, tower = published_layout(siglip_config)
    result = root.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    missing = [k for k in result.missing_keys if "position_ids" not in k]  # 4.x keeps a buffer we don't save
    assert missing == [] and result.unexpected_keys == []
    with torch.no_grad():
        expected = F.normalize(tower.eval()(pixel_values=pixels).pooler_output, dim=-1)
        torch.testing.assert_close(tiny_nearid(pixels).image_embeds, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, named", [
    (lambda w: w.update({"backbone.vision_model.head.probes": w.pop("backbone.vision_model.head.probe")}),
     r"missing: backbone\.vision_model\.head\.probe.*unexpected: backbone\.vision_model\.head\.probes"),
    (lambda w: w.pop("backbone.vision_model.embeddings.position_embedding.weight"),
     r"missing: backbone\.vision_model\.embeddings\.position_embedding\.weight"),
    (lambda w: w.update({"backbone.vision_model.encoder.layers.0.mlp.fc1.weights":
                         w.pop("backbone.vision_model.encoder.layers.0.mlp.fc1.weight")}),
     r"missing: backbone\.vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight"),
])
def test_a_checkpoint_off_the_layout_is_refused_naming_the_keys(tmp_path, tiny_nearid, change, named):
    from safetensors.torch import load_file, save_file

    tiny_nearid.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    change(weights)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=named):
        NearIDModel.from_pretrained(tmp_path)


def test_every_parameter_has_an_initialisation_rule(tiny_nearid):
    for name, module in tiny_nearid.named_modules():
        for parameter in module.parameters(recurse=False):
            with torch.no_grad():
                parameter.fill_(float("nan"))
            tiny_nearid._init_weights(module)
            assert torch.isfinite(parameter).all(), f"{name} has no initialisation rule"


# --- building from SigLIP ------------------------------------------------------------------------


def test_from_siglip_module_reproduces_siglip_embedding(tiny_siglip, pixels):
    model = NearIDModel.from_siglip(tiny_siglip).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).image_embeds, siglip_embedding(tiny_siglip, pixels), atol=1e-5, rtol=1e-5)


def test_from_siglip_vision_only_folder(tmp_path, tiny_siglip, pixels):
    tiny_siglip.save_pretrained(tmp_path)
    model = NearIDModel.from_siglip(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixels), siglip_embedding(tiny_siglip, pixels), atol=1e-5, rtol=1e-5)


def test_from_siglip_full_model_folder(tmp_path, pixels):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(3)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, vocab_size=99)
    full = SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=text)).eval()
    full.save_pretrained(tmp_path)
    model = NearIDModel.from_siglip(str(tmp_path)).eval()
    with torch.no_grad():
        expected = full.get_image_features(pixel_values=pixels)
        expected = F.normalize(getattr(expected, "pooler_output", expected), dim=-1)
        torch.testing.assert_close(model.get_image_features(pixels), expected, atol=1e-5, rtol=1e-5)


def test_from_siglip_rejects_naflex_siglip2(tmp_path):
    from transformers import Siglip2Config

    Siglip2Config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="NaFlex"):
        NearIDModel.from_siglip(str(tmp_path))


# --- forward API ---------------------------------------------------------------------------------


def test_split_forward_and_outputs(tiny_nearid, pixels):
    with torch.no_grad():
        out = tiny_nearid(pixels, output_hidden_states=True)
        with_attentions = tiny_nearid(pixels, output_attentions=True)  # computed on the eager path
        tokens = tiny_nearid.forward_features(pixels)
        pooled = tiny_nearid.forward_head(tokens)
        features = tiny_nearid.get_image_features(pixels)
        raw = tiny_nearid.get_image_features(pixels, normalize=False)
    patches = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2
    assert out.last_hidden_state.shape == (3, patches, 32)
    assert torch.equal(tokens, out.last_hidden_state) and torch.equal(pooled, out.pooler_output)
    assert type(features) is torch.Tensor and features.shape == (3, 32)
    torch.testing.assert_close(features, out.image_embeds)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    assert torch.equal(raw, out.pooler_output) and not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[0], tiny_nearid.vision_model.embeddings(pixels))
    assert out.attentions is None and len(with_attentions.attentions) == 2
    assert with_attentions.attentions[0].shape == (3, 4, patches, patches)
    torch.testing.assert_close(with_attentions.attentions[0].sum(-1), torch.ones(3, 4, patches))
    torch.testing.assert_close(with_attentions.image_embeds, out.image_embeds, atol=1e-5, rtol=1e-5)


def test_unnormalised_config_returns_raw_embeddings(tiny_nearid, pixels):
    tiny_nearid.config.normalize_embeddings = False
    with torch.no_grad():
        out = tiny_nearid(pixels)
    assert torch.equal(out.image_embeds, out.pooler_output)


def test_wrong_image_size_names_expected_shape(tiny_nearid):
    with pytest.raises(ValueError, match=r"\(batch, channels, 30, 30\).*NearIDImageProcessor"):
        tiny_nearid(torch.zeros(1, 3, 32, 32))


def test_fast_head_equals_multihead_attention(tiny_siglip):
    """The folded single-query head computes exactly SigLIP's nn.MultiheadAttention pooling, values and grads."""
    model = NearIDModel.from_siglip(tiny_siglip)
    tokens = torch.randn(4, 225, 32, requires_grad=True)
    ours = model.forward_head(tokens)
    reference = siglip_tower(tiny_siglip).head(tokens)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(ours)
    grad_ours = torch.autograd.grad((ours * weights).sum(), [tokens, *model.head.parameters()])
    grad_ref = torch.autograd.grad((reference * weights).sum(), [tokens, *siglip_tower(tiny_siglip).head.parameters()])
    for a, b in zip(grad_ours, grad_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sdpa_and_eager_agree(tmp_path, tiny_nearid, pixels):
    tiny_nearid.save_pretrained(tmp_path)
    eager = NearIDModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = NearIDModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(pixels).image_embeds, sdpa(pixels).image_embeds, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_matches_fp32(tiny_nearid, pixels, dtype, atol):
    with torch.no_grad():
        reference = tiny_nearid(pixels).image_embeds
        half = tiny_nearid.to(dtype)(pixels.to(dtype)).image_embeds
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), reference, atol=atol, rtol=0)


def test_frozen_backbone_gets_no_gradients(tiny_nearid, pixels):
    tiny_nearid.train().freeze_backbone()
    tiny_nearid(pixels).image_embeds.sum().backward()
    for name, parameter in tiny_nearid.named_parameters():
        if name.startswith("backbone.vision_model.head."):
            assert parameter.requires_grad and parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
