"""Make tests/fixtures/smolvla_tiny: a tiny random SmolVLA in lerobot's checkpoint layout, with reference outputs
computed by lerobot 0.6.1's own modules (`SmolVLAPolicy`, `VLAFlowMatching`, `SmolVLMWithExpertModel`).

lerobot 0.6.1 needs Python >= 3.12, torch < 2.12 and transformers >= 5.4, < 5.6, so this script runs in a throwaway
environment, never in dcvla's:

    ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lerobot312
    /tmp/lerobot312/bin/pip install "lerobot[pi,smolvla]==0.6.1"   # torch 2.11.0, transformers 5.5.4 (pip's choice)
    /tmp/lerobot312/bin/python scripts/make_smolvla_parity_fixture.py

lerobot builds SmolVLA's VLM from the hub (`AutoConfig` / `AutoProcessor.from_pretrained(vlm_model_name)` in
`smolvlm_with_expert`), so two module globals of `lerobot.policies.smolvla.smolvlm_with_expert` are patched, nothing
in the computation:
- `AutoConfig.from_pretrained` returns a tiny `transformers.SmolVLMConfig`: vision 32 wide, 2 layers, 2 heads,
  MLP 64, 64 px in 8 px patches (64 patches), pixel-shuffle scale 4 (4 tokens per image, 32 * 16 = 512 -> 64); a
  Llama text model 64 wide, 6 layers (lerobot keeps the first 4), 4 heads to 2 K/V heads of 16, MLP 128, vocab 320,
  rope_theta 100000 (which lerobot's own RoPE ignores), untied `lm_head`;
- `AutoProcessor.from_pretrained` returns a stub whose tokenizer has only the two special ids lerobot reads;
- nothing else: the prefix, the masks, positions, the interleaved self/cross-attention layers, the expert (48 wide,
  MLP 256 by lerobot's `get_intermediate_size`), time embedding, Euler loop and heads are lerobot's.
The random weights are redrawn so that nothing is degenerate (every matrix N(0, 1/fan_in), every constant vector
- norm weights, zero biases - jittered by N(0, 0.1^2)) and rounded to bfloat16: the checkpoint is stored in
bfloat16 (442,112 parameters: 0.9 MB, where float32 would take 1.8 MB) and the references are computed in float32
from exactly those values.

Saved, as a lerobot checkpoint directory holds them:
- `model.safetensors` and `config.json` by lerobot's own `SmolVLAPolicy.save_pretrained`;
- `policy_preprocessor.json` / `policy_postprocessor.json` with their normalizer steps' statistics (MEAN_STD for
  state and action), saved by lerobot's pipelines (SmolVLA's tokenizer step needs the hub, so only the normalizer
  steps are kept);
- `fixture.json`: the tiny dims, the token ids, the versions that made it, what the checkpoint's keys hold;
- `reference.safetensors`: the inputs (two raw cameras, one 48 x 80, one 32 x 32; the pixels lerobot's
  `prepare_images` makes of them; a right-padded prompt; a raw state and the normalised padded state; the noise)
  and lerobot's outputs (each camera's image features, every kept VLM layer's post-RoPE prefix K/V, the velocity
  at t = 1 from the fixed noise, the action chunk, the chunk un-normalised by the saved postprocessor).
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import SmolVLMConfig

import lerobot
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.common.vla_utils import make_att_2d_masks
from lerobot.policies.smolvla import smolvlm_with_expert
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.processor import (PolicyProcessorPipeline, make_default_policy_processor_steps,
                               make_policy_processor_pipelines)
from lerobot.utils.constants import ACTION, OBS_STATE

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "smolvla_tiny"
SEED = 0
VLM_NAME = "tiny-smolvlm2"  # never resolved: `AutoConfig` / `AutoProcessor` are patched
VOCAB = 320
TOKEN_IDS = dict(pad=2, image_token_id=310, fake_image_token_id=311, global_image_token_id=312)
IMAGE = 64  # SmolVLA's resize_imgs_with_padding and the vision encoder's image_size
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
              patch_size=8)
SCALE_FACTOR = 4  # pixel shuffle: 64 patches -> 4 tokens of 32 * 16 = 512 -> the text width
TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=100_000.0,
            tie_word_embeddings=False, pad_token_id=TOKEN_IDS["pad"])
NUM_VLM_LAYERS = 4
EXPERT_WIDTH_MULTIPLIER = 0.75
CHUNK = STEPS = 10
STATE_DIM, ACTION_DIM = 8, 7  # LIBERO's
CAMERAS = {"observation.images.image": (48, 80), "observation.images.wrist_image": (32, 32)}  # raw (H, W)
PROMPT_LEN, PROMPT_VALID = 12, 9  # right padding with the pad id, as lerobot's tokenizer step pads; text ids 3..309
JITTER = 0.1
SAVE_DTYPE = torch.bfloat16


def tiny_vlm_config() -> SmolVLMConfig:
    return SmolVLMConfig(vision_config=dict(VISION), text_config=dict(TEXT), scale_factor=SCALE_FACTOR,
                         image_token_id=TOKEN_IDS["image_token_id"], pad_token_id=TOKEN_IDS["pad"],
                         tie_word_embeddings=False)


def tiny_processor():
    return types.SimpleNamespace(tokenizer=types.SimpleNamespace(
        fake_image_token_id=TOKEN_IDS["fake_image_token_id"], global_image_token_id=TOKEN_IDS["global_image_token_id"]))


smolvlm_with_expert.AutoConfig = types.SimpleNamespace(from_pretrained=lambda model_id, **_: tiny_vlm_config())
smolvlm_with_expert.AutoProcessor = types.SimpleNamespace(from_pretrained=lambda model_id, **_: tiny_processor())


def policy_config() -> SmolVLAConfig:
    config = SmolVLAConfig(
        chunk_size=CHUNK, n_action_steps=CHUNK, num_steps=STEPS, max_state_dim=32, max_action_dim=32,
        resize_imgs_with_padding=(IMAGE, IMAGE), vlm_model_name=VLM_NAME, load_vlm_weights=False,
        num_vlm_layers=NUM_VLM_LAYERS, num_expert_layers=-1, expert_width_multiplier=EXPERT_WIDTH_MULTIPLIER,
        attention_mode="cross_attn", self_attn_every_n_layers=2, device="cpu")
    config.input_features = {OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
                             **{key: PolicyFeature(type=FeatureType.VISUAL, shape=(3, 256, 256)) for key in CAMERAS}}
    config.output_features = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}
    return config


@torch.no_grad()
def randomise(policy: torch.nn.Module, generator: torch.Generator) -> None:
    """Matrices N(0, 1/fan_in) (transformers' 0.02 leaves attention almost uniform at these widths); constant vectors
    (norm weights, zero biases) jittered; all rounded to bfloat16, so the stored checkpoint holds exactly them."""
    for param in policy.parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
        elif torch.all(param == param.flatten()[0]):
            param.add_(torch.randn(param.shape, generator=generator) * JITTER)
        param.copy_(param.to(SAVE_DTYPE).float())


def inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    tokens = torch.randint(TOKEN_IDS["pad"] + 1, TOKEN_IDS["image_token_id"], (1, PROMPT_LEN), generator=generator)
    tokens[:, PROMPT_VALID:] = TOKEN_IDS["pad"]
    return {
        **{f"image_{i}": torch.rand(1, 3, h, w, generator=generator) for i, (h, w) in enumerate(CAMERAS.values())},
        "lang_tokens": tokens, "lang_masks": torch.arange(PROMPT_LEN)[None] < PROMPT_VALID,
        "raw_state": torch.randn(STATE_DIM, generator=generator),
        "noise": torch.randn(1, CHUNK, 32, generator=generator),
    }


def dataset_stats(generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Statistics of a LIBERO-sized dataset, every kind lerobot computes (MEAN_STD reads mean and std)."""
    def of(dim: int) -> dict[str, torch.Tensor]:
        mean, spread = torch.randn(dim, generator=generator), torch.rand(dim, generator=generator) + 0.5
        return {"mean": mean, "std": spread, "min": mean - 2 * spread, "max": mean + 2 * spread,
                "q01": mean - 1.5 * spread, "q99": mean + 1.7 * spread}
    return {OBS_STATE: of(STATE_DIM), ACTION: of(ACTION_DIM)}


def save_processors(config: SmolVLAConfig, stats: dict, out: Path):
    """lerobot's normalizer and unnormalizer steps, saved as a checkpoint holds them, and read back from the files."""
    steps = make_default_policy_processor_steps(config, stats)
    pre, post = make_policy_processor_pipelines(input_steps=[steps.normalize], output_steps=[steps.unnormalize])
    pre.save_pretrained(out)
    post.save_pretrained(out)
    return (PolicyProcessorPipeline.from_pretrained(out, config_filename="policy_preprocessor.json"),
            PolicyProcessorPipeline.from_pretrained(out, config_filename="policy_postprocessor.json",
                                                    to_transition=post.to_transition, to_output=post.to_output))


@torch.no_grad()
def references(policy: SmolVLAPolicy, x: dict[str, torch.Tensor], pre) -> dict[str, torch.Tensor]:
    """lerobot's outputs, step by step as `sample_actions` takes them."""
    model, vlm = policy.model, policy.model.vlm_with_expert
    batch = pre({OBS_STATE: x["raw_state"][None]})
    batch.update({key: x[f"image_{i}"] for i, key in enumerate(CAMERAS)})
    images, image_masks = policy.prepare_images(batch)
    state = policy.prepare_state(batch)
    out = {"pixels": torch.stack(images), "image_masks": torch.cat(image_masks), "state": state}
    out.update({f"image_features_{i}": vlm.embed_image(image) for i, image in enumerate(images)})
    embs, pad, att = model.embed_prefix(images, image_masks, x["lang_tokens"], x["lang_masks"], state=state)
    positions = torch.cumsum(pad, dim=1) - 1
    _, cache = vlm.forward(attention_mask=make_att_2d_masks(pad, att), position_ids=positions, past_key_values=None,
                           inputs_embeds=[embs, None], use_cache=True)
    for layer, entry in enumerate(cache.layers):
        out[f"prefix_k_{layer}"], out[f"prefix_v_{layer}"] = entry.keys.clone(), entry.values.clone()
    out.update({"prefix_embs": embs, "prefix_pad_masks": pad, "prefix_att_masks": att, "prefix_positions": positions})
    out["velocity"] = model.denoise_step(pad, cache, x["noise"], torch.ones(1))
    out["actions"] = model.sample_actions(images, image_masks, x["lang_tokens"], x["lang_masks"], state,
                                          noise=x["noise"])
    return out


@torch.no_grad()
def check(policy: SmolVLAPolicy, x: dict, ref: dict) -> None:
    """Determinism, the velocity being the Euler loop's first, and the saved checkpoint reproducing the chunk."""
    images, masks = list(ref["pixels"]), list(ref["image_masks"][:, None])
    args = (images, masks, x["lang_tokens"], x["lang_masks"], ref["state"])
    assert torch.equal(policy.model.sample_actions(*args, noise=x["noise"]), ref["actions"])
    policy.config.num_steps = 1
    try:
        one_step = policy.model.sample_actions(*args, noise=x["noise"])
    finally:
        policy.config.num_steps = STEPS
    assert torch.allclose(one_step, x["noise"] - ref["velocity"], atol=1e-6)
    reloaded = SmolVLAPolicy.from_pretrained(OUT, strict=True)
    assert torch.equal(reloaded.model.sample_actions(*args, noise=x["noise"]), ref["actions"])
    for key, value in {**x, **ref}.items():
        if value.is_floating_point():
            print(f"  {key:20s} {str(tuple(value.shape)):18s} max |x| {value.abs().max():.4f}")


def prefixes(keys: list[str]) -> dict[str, int]:
    """The checkpoint's keys grouped by module (layers folded), with how many tensors each holds."""
    groups: dict[str, int] = {}
    for key in keys:
        head = key.split(".layers.")[0] + ".layers" if ".layers." in key else key.rsplit(".", 1)[0]
        groups[head] = groups.get(head, 0) + 1
    return groups


def checkpoint_keys(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        keys = sorted(f.keys())
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in keys})
    expert = [k for k in keys if ".lm_expert." in k]
    return {"dtypes": dtypes, "tensors": len(keys), "modules": prefixes(keys),
            "has_vlm_lm_head": "model.vlm_with_expert.vlm.lm_head.weight" in keys,
            "lm_expert_lm_head_or_embed_tokens": [k for k in expert if "lm_head" in k or "embed_tokens" in k],
            "vlm_text_layers_kept": sorted({int(k.split("text_model.layers.")[1].split(".")[0])
                                            for k in keys if "text_model.layers." in k})}


def main() -> None:
    torch.manual_seed(SEED)
    config = policy_config()
    policy = SmolVLAPolicy(config).eval()
    randomise(policy, torch.Generator().manual_seed(SEED))
    OUT.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(SEED + 2)
    pre, post = save_processors(config, dataset_stats(generator), OUT)
    x = inputs(torch.Generator().manual_seed(SEED + 1))
    ref = references(policy, x, pre)
    normalized_action = ref["actions"][:, :, :ACTION_DIM]  # what select_action hands the postprocessor
    ref.update({"normalized_action": normalized_action, "unnormalized_action": post(normalized_action)})
    copy.deepcopy(policy).to(SAVE_DTYPE).save_pretrained(OUT)
    save_file({k: v.contiguous() for k, v in {**x, **ref}.items()}, OUT / "reference.safetensors")
    keys = checkpoint_keys(OUT / "model.safetensors")
    vlm = policy.model.vlm_with_expert
    text, expert = vlm.config.text_config, vlm.lm_expert.config
    (OUT / "fixture.json").write_text(json.dumps({
        "variant": "smolvla", "vlm_model_name": VLM_NAME, "vocab_size": VOCAB, "token_ids": TOKEN_IDS,
        "image_size": IMAGE, "vision": VISION, "scale_factor": SCALE_FACTOR,
        "vision_attn_implementation": vlm.get_vlm_model().vision_model.config._attn_implementation,  # noqa: SLF001
        "connector": {"in": VISION["hidden_size"] * SCALE_FACTOR**2, "out": text.hidden_size, "bias": False,
                      "tokens_per_image": (IMAGE // VISION["patch_size"]) ** 2 // SCALE_FACTOR**2},
        "text": {k: v for k, v in TEXT.items() if k != "model_type"}, "num_vlm_layers": vlm.num_vlm_layers,
        "expert": {"width": expert.hidden_size, "mlp_dim": expert.intermediate_size, "depth": vlm.num_expert_layers,
                   "num_heads": expert.num_attention_heads, "num_kv_heads": expert.num_key_value_heads,
                   "head_dim": expert.head_dim},
        "attention_mode": config.attention_mode, "self_attn_every_n_layers": config.self_attn_every_n_layers,
        "cross_attn_layers": [l for l in range(vlm.num_vlm_layers) if l % config.self_attn_every_n_layers],
        "rope_max_wavelength_used": 10_000, "chunk_size": CHUNK, "n_action_steps": CHUNK, "num_steps": STEPS,
        "max_state_dim": config.max_state_dim, "max_action_dim": config.max_action_dim,
        "state_dim": STATE_DIM, "action_dim": ACTION_DIM, "cameras": {k: list(v) for k, v in CAMERAS.items()},
        "prompt_len": PROMPT_LEN, "prompt_valid": PROMPT_VALID, "prefix_len": int(ref["prefix_pad_masks"].shape[1]),
        "parameters": sum(p.numel() for p in policy.parameters()), "checkpoint": keys,
        "made_with": {"lerobot": lerobot.__version__, "torch": torch.__version__,
                      "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "normalization": {k: v.value for k, v in config.normalization_mapping.items()},
    }, indent=1) + "\n")
    print(f"{OUT}: {keys['tensors']} tensors {keys['dtypes']}, lm_head {keys['has_vlm_lm_head']}, "
          f"expert lm_head/embed_tokens {keys['lm_expert_lm_head_or_embed_tokens']}")
    for module, count in keys["modules"].items():
        print(f"  {count:3d}  {module}")
    check(policy, x, ref)


if __name__ == "__main__":
    main()
