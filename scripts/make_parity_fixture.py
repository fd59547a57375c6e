"""Build the golden parity fixture ``tests/fixtures/openvla_tiny/`` from upstream timm.

This is the *independent reference* for dcvla's transformers-based rebuild of
OpenVLA ("dinosiglip-vit-so-224px" vision backbone + fused projector + Llama-2).
It re-implements, with timm + torchvision + transformers only, what upstream
OpenVLA does (``prismatic/extern/hf/modeling_prismatic.py`` and
``processing_prismatic.py``) at a tiny size, randomises every weight, stores
the checkpoint the way the published checkpoints are stored (sharded bf16
safetensors + index + dataset_statistics.json) and writes reference outputs.
It deliberately does NOT import dcvla.

How to run (timm must NOT be installed into the project venv, use a throwaway one)::

    python -m venv /tmp/timmvenv
    /tmp/timmvenv/bin/pip install torch torchvision timm transformers safetensors pillow numpy
    /tmp/timmvenv/bin/python scripts/make_parity_fixture.py            # from the repo root

Optional: ``--out DIR`` (default ``tests/fixtures/openvla_tiny`` next to this
script's repo root). The script is deterministic (fixed seeds, CPU only) and
finishes in a few seconds. It ends with a self-check that reloads the written
shards into fresh timm models and asserts the stored references are reproduced
exactly.

Fixture contents
----------------
* ``model-00001-of-00002.safetensors``: ``vision_backbone.featurizer.*``
  (timm DINOv2-reg4 state dict), ``vision_backbone.fused_featurizer.*`` (timm
  SigLIP state dict, incl. last block, final ``norm`` and ``attn_pool``) and
  ``projector.*``; bfloat16.
* ``model-00002-of-00002.safetensors``: ``language_model.*`` (transformers
  ``LlamaForCausalLM`` state dict); bfloat16.
* ``model.safetensors.index.json``: ``{"metadata": {"total_size"}, "weight_map"}``.
* ``dataset_statistics.json``: made-up norm stats for ``libero_spatial_no_noops``
  and ``bridge_orig`` in upstream's layout.
* ``reference.safetensors``: ``image`` uint8 [256,256,3], ``pixel_values`` f32
  [1,6,224,224], ``dino_features`` f32 [1,256,32], ``siglip_features`` f32
  [1,256,48], ``projector_output`` f32 [1,256,32]; all computed in float32
  from the bf16-rounded weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
from functools import partial
from pathlib import Path

import numpy as np
import PIL
import safetensors
import timm
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms.functional as TVF
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import AttentionPoolLatent, LayerScale
from torchvision.transforms import InterpolationMode
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 20240613

# ----------------------------------------------------------------------------------------------
# Tiny preset (dcvla's `tiny` preset has exactly these dims)
# ----------------------------------------------------------------------------------------------
IMG_SIZE = 224
DINO_ID = "vit_large_patch14_reg4_dinov2"  # upstream: "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_ID = "vit_so400m_patch14_siglip_224"
DINO_OVERRIDES = dict(embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0)
SIGLIP_OVERRIDES = dict(embed_dim=48, depth=4, num_heads=2, mlp_ratio=2.0)
# Upstream "dinosiglip-vit-so-224px" passes timm_override_act_layers = [None, None].
TIMM_OVERRIDE_ACT_LAYERS = (None, None)
LLM_CONFIG = dict(
    hidden_size=32,
    intermediate_size=88,
    num_hidden_layers=16,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=32064,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)

# Upstream image processing ("resize-naive"), DINOv2 first, SigLIP second.
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

SHARD_VISION = "model-00001-of-00002.safetensors"
SHARD_LLM = "model-00002-of-00002.safetensors"


# ----------------------------------------------------------------------------------------------
# Upstream pieces, reproduced verbatim in behaviour
# ----------------------------------------------------------------------------------------------
def _ls_new_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Upstream's patched LayerScale.forward (parameter renamed gamma -> scale_factor)."""
    return x.mul_(self.scale_factor) if self.inplace else x * self.scale_factor


def ls_apply_patch(ls_module: LayerScale) -> None:
    """Upstream's monkey-patch: HF from_pretrained mangles params called `gamma`."""
    ls_module.scale_factor = nn.Parameter(ls_module.gamma.clone())
    ls_module.forward = _ls_new_forward.__get__(ls_module, LayerScale)
    del ls_module.gamma


def unpack_tuple(fn):
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        return result[0] if isinstance(result, (tuple, list)) else result

    return wrapper


def create_towers(patch_layerscale: bool = True) -> tuple[nn.Module, nn.Module]:
    """Create (featurizer, fused_featurizer) exactly like upstream PrismaticVisionBackbone."""
    featurizer = timm.create_model(
        DINO_ID, pretrained=False, num_classes=0, img_size=IMG_SIZE,
        act_layer=TIMM_OVERRIDE_ACT_LAYERS[0], **DINO_OVERRIDES,
    )
    fused = timm.create_model(
        SIGLIP_ID, pretrained=False, num_classes=0, img_size=IMG_SIZE,
        act_layer=TIMM_OVERRIDE_ACT_LAYERS[1], **SIGLIP_OVERRIDES,
    )
    for m in (featurizer, fused):
        m.eval()
        # Upstream: forward = get_intermediate_layers(x, n={len(blocks) - 2}) unpacked.
        m.forward = unpack_tuple(partial(m.get_intermediate_layers, n={len(m.blocks) - 2}))
        if patch_layerscale:
            for module in m.modules():
                if isinstance(module, LayerScale):
                    ls_apply_patch(module)
    return featurizer, fused


class PrismaticProjector(nn.Module):
    """Upstream fused projector: fc1 -> GELU -> fc2 -> GELU -> fc3."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.initial_projection_dim = vision_dim * 4
        self.fc1 = nn.Linear(vision_dim, self.initial_projection_dim, bias=True)
        self.fc2 = nn.Linear(self.initial_projection_dim, llm_dim, bias=True)
        self.fc3 = nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1 = nn.GELU()
        self.act_fn2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(x)))))


def vision_forward(featurizer, fused, pixel_values):
    """Upstream PrismaticVisionBackbone.forward for the fused case."""
    img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
    patches, patches_fused = featurizer(img), fused(img_fused)
    return patches, patches_fused, torch.cat([patches, patches_fused], dim=2)


def upstream_pixel_values(image: Image.Image) -> torch.Tensor:
    """PrismaticImageProcessor.apply_transform for resize-naive, both towers, batched."""
    imgs_t = []
    for mean, std in ((DINO_MEAN, DINO_STD), (SIGLIP_MEAN, SIGLIP_STD)):
        img = TVF.resize(image, size=(IMG_SIZE, IMG_SIZE), interpolation=InterpolationMode.BICUBIC,
                         max_size=None, antialias=True)
        img = TVF.center_crop(img, output_size=IMG_SIZE)
        t = TVF.to_tensor(img)
        t = TVF.normalize(t, mean=mean, std=std)
        imgs_t.append(t)
    return torch.vstack(imgs_t).unsqueeze(0)  # [1, 6, 224, 224]


# ----------------------------------------------------------------------------------------------
# Structure checks (tiny vs the real-size architecture, built on the meta device)
# ----------------------------------------------------------------------------------------------
def _describe(m: nn.Module) -> dict:
    blk = m.blocks[0]
    return dict(
        cls=m.cls_token is not None,
        num_reg_tokens=m.num_reg_tokens,
        num_prefix_tokens=m.num_prefix_tokens,
        no_embed_class=m.no_embed_class,
        pos_embed_len=m.pos_embed.shape[1],
        ls1=type(blk.ls1).__name__,
        ls2=type(blk.ls2).__name__,
        act=repr(blk.mlp.act),
        mlp_ratio_hidden=blk.mlp.fc1.out_features / blk.mlp.fc1.in_features,
        norm_eps=blk.norm1.eps,
        qkv_bias=blk.attn.qkv.bias is not None,
        q_norm=type(blk.attn.q_norm).__name__,
        norm_pre=type(m.norm_pre).__name__,
        norm=type(m.norm).__name__,
        fc_norm=type(m.fc_norm).__name__,
        attn_pool=type(m.attn_pool).__name__ if m.attn_pool is not None else None,
        global_pool=m.global_pool,
        patch_size=m.patch_embed.patch_size,
        patch_bias=m.patch_embed.proj.bias is not None,
        dynamic_img_size=m.dynamic_img_size,
    )


def _key_pattern(keys) -> set[str]:
    return {re.sub(r"blocks\.\d+\.", "blocks.N.", k) for k in keys}


def check_structure(featurizer, fused) -> None:
    with torch.device("meta"):
        big_dino = timm.create_model(DINO_ID, pretrained=False, num_classes=0, img_size=IMG_SIZE,
                                     act_layer=None)
        big_siglip = timm.create_model(SIGLIP_ID, pretrained=False, num_classes=0, img_size=IMG_SIZE,
                                       act_layer=None)
    for name, tiny, big in (("DINOv2", featurizer, big_dino), ("SigLIP", fused, big_siglip)):
        dt, db = _describe(tiny), _describe(big)
        print(f"[structure] {name} tiny: {dt}")
        diffs = {k: (dt[k], db[k]) for k in dt if dt[k] != db[k] and k != "mlp_ratio_hidden"}
        print(f"[structure] {name} differences vs real-size (tiny, real): {diffs or 'none'}")
        assert not diffs, f"{name}: tiny differs structurally from the real architecture: {diffs}"
        # Same key layout (real one's keys, with LayerScale renamed like upstream does).
        big_keys = {k.replace(".gamma", ".scale_factor") for k in big.state_dict().keys()}
        assert _key_pattern(tiny.state_dict().keys()) == _key_pattern(big_keys), name
        print(f"[structure] {name} real-size: embed={big.embed_dim} depth={len(big.blocks)} "
              f"mlp_hidden={big.blocks[0].mlp.fc1.out_features} act={db['act']}")

    # Explicit expectations for the tiny preset.
    d, s = featurizer, fused
    assert d.embed_dim == 32 and len(d.blocks) == 4 and d.blocks[0].attn.num_heads == 2
    assert d.blocks[0].mlp.fc1.out_features == 128
    assert d.cls_token is not None and d.num_reg_tokens == 4 and d.num_prefix_tokens == 5
    assert d.no_embed_class and tuple(d.pos_embed.shape) == (1, 256, 32)
    assert isinstance(d.blocks[0].ls1, LayerScale) and isinstance(d.blocks[0].ls2, LayerScale)
    assert isinstance(d.blocks[0].mlp.act, nn.GELU) and d.blocks[0].mlp.act.approximate == "none"
    assert s.embed_dim == 48 and len(s.blocks) == 4 and s.blocks[0].attn.num_heads == 2
    assert s.blocks[0].mlp.fc1.out_features == 96, s.blocks[0].mlp.fc1.out_features
    assert s.cls_token is None and s.num_reg_tokens == 0 and s.num_prefix_tokens == 0
    assert tuple(s.pos_embed.shape) == (1, 256, 48)
    assert isinstance(s.attn_pool, AttentionPoolLatent)
    assert isinstance(s.blocks[0].ls1, nn.Identity)
    # NOTE: upstream OpenVLA's SigLIP tower (timm, act_layer=None) uses EXACT erf GELU,
    # not HF SigLIP's gelu_pytorch_tanh. Record what timm really builds.
    assert isinstance(s.blocks[0].mlp.act, nn.GELU), s.blocks[0].mlp.act
    print(f"[structure] SigLIP MLP activation: {s.blocks[0].mlp.act!r} "
          f"(attn_pool mlp act: {s.attn_pool.mlp.act!r})")


# ----------------------------------------------------------------------------------------------
# Randomisation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: nn.Module, gen: torch.Generator) -> None:
    """Give every parameter a non-trivial value so each one affects the outputs."""
    touched: set[int] = set()

    def normal_(p, mean, std):
        p.copy_(torch.randn(p.shape, generator=gen) * std + mean)
        touched.add(id(p))

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            normal_(module.weight, 0.0, 1.0 / math.sqrt(fan_in))
            if module.bias is not None:
                normal_(module.bias, 0.0, 0.1)
        elif isinstance(module, nn.LayerNorm):
            normal_(module.weight, 1.0, 0.1)
            normal_(module.bias, 0.0, 0.1)
        elif isinstance(module, LayerScale):
            p = module.scale_factor if hasattr(module, "scale_factor") else module.gamma
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # U(0.5, 1.5)
            touched.add(id(p))
    for name in ("cls_token", "reg_token", "pos_embed"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            normal_(p, 0.0, 0.5)
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        normal_(pool.latent, 0.0, 0.5)
    missed = [n for n, p in model.named_parameters() if id(p) not in touched]
    assert not missed, f"parameters not randomised: {missed}"


@torch.no_grad()
def round_to_bf16_(model: nn.Module) -> None:
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).to(torch.float32))


# ----------------------------------------------------------------------------------------------
# Inputs and stats
# ----------------------------------------------------------------------------------------------
def make_scene_image(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A tabletop-like scene: wall/table gradients, a few coloured boxes, a disc, mild noise."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    horizon = int(0.45 * h)
    # Wall: vertical + horizontal gradient; table: warm wood-ish gradient.
    t = yy / h
    wall = np.stack([150 + 60 * t + 20 * xx / w, 170 + 40 * t, 200 - 30 * t - 20 * xx / w], -1)
    table = np.stack([140 + 50 * t, 100 + 30 * t, 60 + 10 * t], -1)
    img[:] = np.where((yy < horizon)[..., None], wall, table)
    # Coloured boxes (x0, y0, x1, y1, rgb), with a darker "shadow" edge.
    boxes = [
        (30, 120, 90, 190, (200, 40, 40)),
        (110, 140, 150, 215, (40, 160, 60)),
        (170, 100, 235, 160, (40, 70, 200)),
        (60, 40, 120, 80, (230, 200, 50)),
    ]
    for x0, y0, x1, y1, rgb in boxes:
        img[y0:y1, x0:x1] = rgb
        img[y1 - 4:y1, x0:x1] *= 0.6
    # A disc ("bowl") with radial shading.
    cy, cx, r = 200.0, 200.0, 28.0
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    disc = d < r
    shade = (1.0 - 0.4 * (d / r))[..., None]
    img = np.where(disc[..., None], np.array([230, 230, 220], np.float32) * shade, img)
    img += rng.normal(0.0, 4.0, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_dataset_statistics(rng: np.random.Generator) -> dict:
    """Upstream layout: action has a `mask` (gripper dim False); proprio has no mask
    (upstream only adds `mask` to the action stats)."""

    def stats(dim, scale, center, gripper_last=False):
        mean = rng.normal(center, 0.1 * scale, dim)
        std = np.abs(rng.normal(scale, 0.2 * scale, dim)) + 1e-3
        q01 = mean - 2.3 * std
        q99 = mean + 2.3 * std
        mn = q01 - np.abs(rng.normal(0.5, 0.1, dim)) * std
        mx = q99 + np.abs(rng.normal(0.5, 0.1, dim)) * std
        if gripper_last:  # gripper: binary-ish in [0, 1]
            mean[-1], std[-1], mn[-1], q01[-1], q99[-1], mx[-1] = 0.52, 0.49, 0.0, 0.0, 1.0, 1.0
        f = lambda a: [float(np.float32(v)) for v in a]  # noqa: E731
        return dict(mean=f(mean), std=f(std), max=f(mx), min=f(mn), q01=f(q01), q99=f(q99))

    out = {}
    for key, a_scale, p_dim, n_tr, n_traj in (
        ("libero_spatial_no_noops", 0.3, 8, 52970, 432),
        ("bridge_orig", 0.01, 7, 2135463, 60064),
    ):
        action = stats(7, a_scale, 0.0, gripper_last=True)
        action["mask"] = [True] * 6 + [False]
        out[key] = {
            "action": action,
            "proprio": stats(p_dim, 0.2, 0.1),
            "num_transitions": n_tr,
            "num_trajectories": n_traj,
        }
        for s in (out[key]["action"], out[key]["proprio"]):
            assert all(lo < hi for lo, hi in zip(s["q01"], s["q99"]))
            assert all(lo <= q for lo, q in zip(s["min"], s["q01"]))
            assert all(q <= hi for q, hi in zip(s["q99"], s["max"]))
    return out


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def check_every_param_matters(featurizer, fused, projector, pixel_values) -> None:
    """Gradient check: every parameter must influence the outputs, except the ones upstream
    never uses (last block, final norm, SigLIP attn_pool)."""
    for m in (featurizer, fused, projector):
        m.zero_grad(set_to_none=True)
    with torch.enable_grad():
        dino, sig, cat = vision_forward(featurizer, fused, pixel_values)
        proj = projector(cat)
        g = torch.Generator().manual_seed(SEED + 7)
        loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in (dino, sig, proj))
        loss.backward()
    unused = []
    for prefix, m in (("featurizer", featurizer), ("fused_featurizer", fused), ("projector", projector)):
        for n, p in m.named_parameters():
            if p.grad is None or p.grad.abs().max().item() == 0.0:
                unused.append(f"{prefix}.{n}")
            elif p.grad.abs().max().item() < 1e-6:
                raise AssertionError(f"{prefix}.{n} barely affects outputs: {p.grad.abs().max()}")
    expected_unused = set()
    for prefix, m in (("featurizer", featurizer), ("fused_featurizer", fused)):
        last = len(m.blocks) - 1
        for n, _ in m.named_parameters():
            if n.startswith(f"blocks.{last}.") or n.startswith("norm.") or n.startswith("attn_pool."):
                expected_unused.add(f"{prefix}.{n}")
    assert set(unused) == expected_unused, sorted(set(unused) ^ expected_unused)
    print(f"[check] every used parameter has a non-zero gradient; {len(unused)} params unused by "
          "design (last block, final norm, attn_pool)")
    for m in (featurizer, fused, projector):
        m.zero_grad(set_to_none=True)


def main() -> None:
    repo_root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=repo_root / "tests" / "fixtures" / "openvla_tiny")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    print(f"versions: torch {torch.__version__}, timm {timm.__version__}, torchvision "
          f"{torchvision.__version__}, transformers {transformers.__version__}, safetensors "
          f"{safetensors.__version__}, pillow {PIL.__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}")

    # ---- models -------------------------------------------------------------------------------
    featurizer, fused = create_towers(patch_layerscale=True)
    check_structure(featurizer, fused)
    vision_dim = featurizer.embed_dim + fused.embed_dim
    projector = PrismaticProjector(vision_dim, LLM_CONFIG["hidden_size"]).eval()
    assert (projector.fc1.in_features, projector.fc1.out_features, projector.fc2.out_features,
            projector.fc3.out_features) == (80, 320, 32, 32)

    gen = torch.Generator().manual_seed(SEED)
    randomize_(featurizer, gen)
    randomize_(fused, gen)
    randomize_(projector, gen)

    torch.manual_seed(SEED + 1)  # transformers' default init draws from the global RNG
    llm = LlamaForCausalLM(LlamaConfig(**LLM_CONFIG)).eval()
    with torch.no_grad():
        for n, p in llm.named_parameters():
            if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    assert llm.model.embed_tokens.weight.data_ptr() != llm.lm_head.weight.data_ptr()

    for m in (featurizer, fused, projector, llm):
        round_to_bf16_(m)

    # ---- checkpoint ---------------------------------------------------------------------------
    vision_sd: dict[str, torch.Tensor] = {}
    for prefix, m in (("vision_backbone.featurizer.", featurizer),
                      ("vision_backbone.fused_featurizer.", fused), ("projector.", projector)):
        for k, v in m.state_dict().items():
            vision_sd[prefix + k] = v.detach().to(torch.bfloat16).contiguous()
    llm_sd = {"language_model." + k: v.detach().to(torch.bfloat16).contiguous()
              for k, v in llm.state_dict().items()}
    assert not any(k.endswith(".gamma") for k in vision_sd)
    assert not set(vision_sd) & set(llm_sd)
    meta = {"format": "pt"}
    save_file(vision_sd, str(out / SHARD_VISION), metadata=meta)
    save_file(llm_sd, str(out / SHARD_LLM), metadata=meta)
    total_size = sum(t.numel() * t.element_size() for t in [*vision_sd.values(), *llm_sd.values()])
    weight_map = {k: SHARD_VISION for k in sorted(vision_sd)}
    weight_map.update({k: SHARD_LLM for k in sorted(llm_sd)})
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    rng = np.random.default_rng(SEED)
    stats = make_dataset_statistics(rng)
    (out / "dataset_statistics.json").write_text(json.dumps(stats, indent=2) + "\n")

    # ---- inputs and references (float32 from the bf16-rounded weights) ------------------------
    image_np = make_scene_image(rng)
    pixel_values = upstream_pixel_values(Image.fromarray(image_np, mode="RGB"))
    assert pixel_values.shape == (1, 6, IMG_SIZE, IMG_SIZE) and pixel_values.dtype == torch.float32

    with torch.no_grad():
        dino, sig, cat = vision_forward(featurizer, fused, pixel_values)
        proj = projector(cat)
        # Cross-check get_intermediate_layers against a hand-rolled pass (2nd-to-last block).
        for m, feats in ((featurizer, dino), (fused, sig)):
            x = m.norm_pre(m._pos_embed(m.patch_embed(pixel_values[:, :3] if m is featurizer
                                                      else pixel_values[:, 3:])))
            for blk in m.blocks[: len(m.blocks) - 1]:
                x = blk(x)
            torch.testing.assert_close(x[:, m.num_prefix_tokens:], feats, rtol=0, atol=0)

    check_every_param_matters(featurizer, fused, projector, pixel_values)

    refs = {
        "image": torch.from_numpy(image_np).contiguous(),
        "pixel_values": pixel_values.contiguous(),
        "dino_features": dino.contiguous(),
        "siglip_features": sig.contiguous(),
        "projector_output": proj.contiguous(),
    }
    assert refs["dino_features"].shape == (1, 256, 32)
    assert refs["siglip_features"].shape == (1, 256, 48)
    assert refs["projector_output"].shape == (1, 256, 32)
    # A single metadata key: safetensors writes multi-key metadata in hash order, which would
    # make the file bytes differ between otherwise identical runs.
    save_file(refs, str(out / "reference.safetensors"), metadata={
        "generator": f"scripts/make_parity_fixture.py seed={SEED} torch={torch.__version__} "
                     f"timm={timm.__version__} transformers={transformers.__version__}",
    })

    # ---- self-check: reload from disk into fresh, UNPATCHED timm models -----------------------
    verify(out)

    print("\nfiles:")
    for p in sorted(out.iterdir()):
        print(f"  {p.name:40s} {p.stat().st_size:>10,d} bytes")
    print(f"  total {sum(p.stat().st_size for p in out.iterdir()):,d} bytes")


def verify(out: Path) -> None:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(out / shard)))
    assert set(sd) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert all(t.dtype == torch.bfloat16 for t in sd.values())

    def sub(prefix: str, reverse_ls: bool) -> dict[str, torch.Tensor]:
        d = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
        if reverse_ls:  # undo upstream's LayerScale rename for a stock timm model
            d = {re.sub(r"\.scale_factor$", ".gamma", k): v for k, v in d.items()}
        return d

    featurizer, fused = create_towers(patch_layerscale=False)  # stock timm, `gamma` params
    featurizer.load_state_dict(sub("vision_backbone.featurizer.", True), strict=True)
    fused.load_state_dict(sub("vision_backbone.fused_featurizer.", True), strict=True)
    projector = PrismaticProjector(80, 32).eval()
    projector.load_state_dict(sub("projector.", False), strict=True)
    llm = LlamaForCausalLM(LlamaConfig(**LLM_CONFIG)).eval()
    llm.load_state_dict(sub("language_model.", False), strict=True)

    refs = load_file(str(out / "reference.safetensors"))
    img = refs["image"].numpy()
    assert refs["image"].dtype == torch.uint8 and img.shape == (256, 256, 3)
    pv = upstream_pixel_values(Image.fromarray(img, mode="RGB"))
    assert torch.equal(pv, refs["pixel_values"])
    with torch.no_grad():
        dino, sig, cat = vision_forward(featurizer, fused, pv)
        proj = projector(cat)
    for name, t in (("dino_features", dino), ("siglip_features", sig), ("projector_output", proj)):
        assert refs[name].dtype == torch.float32
        assert torch.equal(t, refs[name]), (name, (t - refs[name]).abs().max())
    print("\n[verify] reloaded shards -> stock timm (gamma restored) reproduce all references exactly")

    print("\n[verify] reference tensors:")
    for name, t in refs.items():
        tf = t.float()
        assert torch.isfinite(tf).all(), name
        print(f"  {name:18s} {str(tuple(t.shape)):18s} {str(t.dtype):14s} max|v|={tf.abs().max():.4f} "
              f"mean|v|={tf.abs().mean():.4f} std={tf.std():.4f}")
        if name != "image":
            assert tf.abs().max() > 0.5 and tf.std() > 0.1, f"{name} looks degenerate"

    def show(title, keys):
        print(f"\n[keys] {title}:")
        for k in keys:
            print(f"  {k} {list(sd[k].shape)}")

    ks = sorted(sd)
    for tower in ("featurizer", "fused_featurizer"):
        p = f"vision_backbone.{tower}."
        show(f"{tower} non-block keys", [k for k in ks if k.startswith(p) and ".blocks." not in k])
        show(f"{tower} blocks.0 keys", [k for k in ks if k.startswith(p + "blocks.0.")])
    show("projector keys", [k for k in ks if k.startswith("projector.")])
    show("language_model non-layer keys + layers.0",
         [k for k in ks if k.startswith("language_model.") and (".layers." not in k or ".layers.0." in k)])
    print(f"\n[keys] total {len(sd)} tensors; total_size {index['metadata']['total_size']:,d} bytes")


if __name__ == "__main__":
    main()
