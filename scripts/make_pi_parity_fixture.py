"""Make tests/fixtures/pi0_tiny and tests/fixtures/pi05_tiny: tiny random pi0 and pi0.5 in lerobot's checkpoint layout,
with reference outputs computed by lerobot 0.6.1's own modules (`PI0Pytorch`, `PI05Pytorch`).

lerobot 0.6.1 needs Python >= 3.12 (PEP 695 syntax in modules its policies import), torch < 2.12 and transformers
>= 5.4, < 5.6, so this script runs in a throwaway environment, never in dcvla's:

    ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lerobot312
    /tmp/lerobot312/bin/pip install "lerobot[pi]==0.6.1"      # torch 2.11.0, transformers 5.5.4 (pip's choice)
    /tmp/lerobot312/bin/python scripts/make_pi_parity_fixture.py

lerobot only builds the published sizes, so three things are patched, nothing in the computation:
- `modeling_pi0{,5}.get_gemma_config` returns tiny Gemma dims for its two variants (8 heads kept: the joint
  attention reshapes its output with a hard-coded 8 * head_dim);
- the PaliGemma and expert classes the module builds are wrapped so their transformers configs shrink before
  construction: SigLIP (width 32, 2 layers, 2 heads, mlp 64, 56 px, patch 14: 16 tokens per image), the projector
  (32 -> the LM width, where lerobot hard-codes 2048), and both vocabularies (lerobot hard-codes 257152);
- nothing else: the prefix, the joint layer, the masks, positions, time embedding, Euler loop and heads are lerobot's.

Saved per model, as a lerobot checkpoint directory holds them:
- `model.safetensors` in the layout of the published `lerobot/pi0_base` (openpi's module names, no `model.` prefix;
  the tied PaliGemma embedding stored as `paligemma.lm_head.weight`; the expert's unused `lm_head` kept);
- `config.json` (lerobot's own, `PreTrainedConfig.save_pretrained`), `policy_preprocessor.json` /
  `policy_postprocessor.json` with their normalizer steps' statistics (pi0: MEAN_STD; pi0.5: QUANTILES, as each
  model's config declares), saved by lerobot's pipelines;
- `fixture.json`: the tiny dims and the versions that made it;
- `reference.safetensors`: the inputs (three image slots, the third masked as an empty camera; a padded prompt;
  the padded state; the noise; a raw LIBERO-sized state and action) and lerobot's outputs (the image features of
  slot 0, every prefix layer's post-RoPE K/V, the velocity at t = 1 from the fixed noise, the action chunk, the
  raw state normalised and the action un-normalised by the saved processors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import lerobot
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.pi0 import modeling_pi0
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi05 import modeling_pi05
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.processor import make_default_policy_processor_steps, make_policy_processor_pipelines
from lerobot.utils.constants import ACTION, OBS_STATE

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320
IMAGE = 56
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14)
LM = modeling_pi0.GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16)
EXPERT = modeling_pi0.GemmaConfig(width=48, depth=2, mlp_dim=96, num_heads=8, num_kv_heads=1, head_dim=16)
CHUNK = 10
PROMPT_LEN, PROMPT_VALID = 12, 9  # right padding, as lerobot's tokenizer step pads


def tiny_gemma(variant: str):
    return {"gemma_2b": LM, "gemma_300m": EXPERT}[variant]


def shrink_vlm(cls):
    def build(config):
        config.vision_config.update({**VISION, "projection_dim": LM.width, "image_size": IMAGE})
        config.text_config.vocab_size = VOCAB
        config._vocab_size = VOCAB  # noqa: SLF001
        config.image_token_index = VOCAB
        return cls(config)
    return build


def shrink_expert(cls):
    def build(config):
        config.vocab_size = VOCAB
        return cls(config)
    return build


for module in (modeling_pi0, modeling_pi05):
    module.get_gemma_config = tiny_gemma
    module.PaliGemmaForConditionalGenerationWithPiGemma = shrink_vlm(module.PaliGemmaForConditionalGenerationWithPiGemma)
    module.PiGemmaForCausalLM = shrink_expert(module.PiGemmaForCausalLM)


def published_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as `lerobot/pi0_base` stores it: the PaliGemma embedding once, as `paligemma.lm_head.weight`
    (lerobot's loader copies it into `embed_tokens`; `make` made the two equal)."""
    state = model.state_dict()
    embed = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    assert torch.equal(state[embed], state["paligemma_with_expert.paligemma.lm_head.weight"])
    del state[embed]
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def inputs(generator: torch.Generator, state_dim: int) -> dict[str, torch.Tensor]:
    images = torch.rand(3, 1, 3, IMAGE, IMAGE, generator=generator) * 2 - 1
    images[2] = -1.0  # an empty camera, as lerobot pads one
    tokens = torch.randint(1, VOCAB, (1, PROMPT_LEN), generator=generator)
    tokens[:, PROMPT_VALID:] = 0
    return {
        "images": images, "image_masks": torch.tensor([True, True, False]),
        "tokens": tokens, "token_masks": torch.arange(PROMPT_LEN)[None] < PROMPT_VALID,
        "state": torch.randn(1, state_dim, generator=generator),
        "noise": torch.randn(1, CHUNK, 32, generator=generator),
    }


@torch.no_grad()
def references(model, x: dict[str, torch.Tensor], pi05: bool) -> dict[str, torch.Tensor]:
    images = list(x["images"])
    masks = [m.reshape(1) for m in x["image_masks"]]
    out = {"image_features": model.paligemma_with_expert.embed_image(images[0])}
    embs, pad, att = model.embed_prefix(images, masks, x["tokens"], x["token_masks"])
    att_2d = modeling_pi0.make_att_2d_masks(pad, att)
    positions = torch.cumsum(pad, dim=1) - 1
    model.paligemma_with_expert.paligemma.model.language_model.config._attn_implementation = "eager"  # noqa: SLF001
    _, cache = model.paligemma_with_expert.forward(
        attention_mask=modeling_pi0.prepare_attention_masks_4d(att_2d), position_ids=positions,
        past_key_values=None, inputs_embeds=[embs, None], use_cache=True)
    for layer, entry in enumerate(cache.layers):
        out[f"prefix_keys_{layer}"], out[f"prefix_values_{layer}"] = entry.keys.clone(), entry.values.clone()
    out["prefix_positions"] = positions
    t1 = torch.ones(1)
    if pi05:
        out["velocity_t1"] = model.denoise_step(pad, cache, x["noise"], t1)
        out["actions"] = model.sample_actions(images, masks, x["tokens"], x["token_masks"], noise=x["noise"])
    else:
        out["velocity_t1"] = model.denoise_step(x["state"], pad, cache, x["noise"], t1)
        out["actions"] = model.sample_actions(images, masks, x["tokens"], x["token_masks"], x["state"], noise=x["noise"])
    return out


STATE_DIM, ACTION_DIM = 8, 7  # LIBERO's


def dataset_stats(generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Statistics of a LIBERO-sized dataset, every kind lerobot computes (each normaliser reads its own)."""
    def of(dim: int) -> dict[str, torch.Tensor]:
        mean, spread = torch.randn(dim, generator=generator), torch.rand(dim, generator=generator) + 0.5
        return {"mean": mean, "std": spread, "min": mean - 2 * spread, "max": mean + 2 * spread,
                "q01": mean - 1.5 * spread, "q99": mean + 1.7 * spread}
    return {OBS_STATE: of(STATE_DIM), ACTION: of(ACTION_DIM)}


def save_processors(config, stats: dict, out: Path, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """lerobot's normalizer and unnormalizer steps, saved as a checkpoint holds them; returns what they do to a raw
    state and to a normalised action."""
    steps = make_default_policy_processor_steps(config, stats)
    pre, post = make_policy_processor_pipelines(input_steps=[steps.normalize], output_steps=[steps.unnormalize])
    pre.save_pretrained(out)
    post.save_pretrained(out)
    raw_state = torch.randn(1, STATE_DIM, generator=generator)
    normalized_action = torch.rand(1, CHUNK, ACTION_DIM, generator=generator) * 2 - 1
    return {"raw_state": raw_state, "normalized_state": steps.normalize._normalize_observation({OBS_STATE: raw_state}, inverse=False)[OBS_STATE],  # noqa: SLF001
            "normalized_action": normalized_action,
            "unnormalized_action": steps.unnormalize._normalize_action(normalized_action, inverse=True)}  # noqa: SLF001


def make(name: str, pi05: bool, seed: int) -> None:
    torch.manual_seed(seed)
    config_cls, model_cls = (PI05Config, modeling_pi05.PI05Pytorch) if pi05 else (PI0Config, modeling_pi0.PI0Pytorch)
    config = config_cls(chunk_size=CHUNK, n_action_steps=CHUNK, image_resolution=(IMAGE, IMAGE), dtype="float32",
                        device="cpu")
    config.input_features = {OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
                             "observation.images.image": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 256, 256)),
                             "observation.images.image2": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 256, 256))}
    config.output_features = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}
    config.empty_cameras = 1
    model = model_cls(config).eval()
    with torch.no_grad():  # lerobot zero-initialises adaRMS's modulation; random values make the test see it
        for param in model.parameters():
            if not param.abs().sum():
                param.normal_(0, 0.1)
        paligemma = model.paligemma_with_expert.paligemma
        paligemma.lm_head.weight.copy_(paligemma.model.language_model.embed_tokens.weight)  # tied, as published
    x = inputs(torch.Generator().manual_seed(seed + 1), config.max_state_dim)
    ref = references(model, x, pi05)
    out = ROOT / "tests" / "fixtures" / name
    out.mkdir(parents=True, exist_ok=True)
    save_file(published_state(model), out / "model.safetensors")
    generator = torch.Generator().manual_seed(seed + 2)
    normalization = save_processors(config, dataset_stats(generator), out, generator)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in {**x, **ref, **normalization}.items()}, out / "reference.safetensors")
    dims = lambda g: {k: getattr(g, k) for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")}  # noqa: E731
    (out / "fixture.json").write_text(json.dumps({
        "variant": "pi05" if pi05 else "pi0", "vocab_size": VOCAB, "image_size": IMAGE, "vision": VISION,
        "paligemma": dims(LM), "action_expert": dims(EXPERT), "chunk_size": CHUNK, "max_state_dim": config.max_state_dim,
        "max_action_dim": config.max_action_dim, "num_inference_steps": config.num_inference_steps,
        "made_with": {"lerobot": lerobot.__version__, "torch": torch.__version__,
                      "transformers": __import__("transformers").__version__, "python": sys.version.split()[0]},
        "normalization": {k.value if hasattr(k, "value") else k: v.value for k, v in config.normalization_mapping.items()},
    }, indent=1) + "\n")
    print(f"{out}: {sum(p.numel() for p in model.parameters())} parameters, actions {tuple(ref['actions'].shape)}")


if __name__ == "__main__":
    make("pi0_tiny", pi05=False, seed=0)
    make("pi05_tiny", pi05=True, seed=1)
