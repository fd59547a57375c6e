"""Build the OpenVLA-OFT parity fixture ``tests/fixtures/oft_tiny/`` by running upstream's own code at tiny dims.

The reference is moojink/openvla-oft itself (commit 213c5ff): its files are taken unchanged from the fetched git
repository into a temporary folder and imported from there, on its transformers fork (moojink/transformers-openvla-oft
bc339d9: v4.40.1 plus bidirectional SDPA attention in ``LlamaSdpaAttention.forward``) and timm 0.9.10. The script
makes a tiny random OpenVLA-OFT, saves it in the published layout (HF ``save_pretrained`` of the merged model in
bf16 shards + index, ``dataset_statistics.json``, DDP-style ``action_head--1000_checkpoint.pt`` (bf16) and
``proprio_projector--1000_checkpoint.pt`` (float32, as ``finetune.py`` trains it)), reloads all of it the way
``experiments/robot/openvla_utils.py`` does (``from_pretrained``, ``load_component_state_dict``) and records float32
references of ``get_vla_action``'s path. It does not import dcvla (it reads dcvla's offline tokenizer file only).

Upstream files copied unchanged (``git show 213c5ff:<path>``):
``prismatic/extern/hf/{configuration,modeling,processing}_prismatic.py``, ``prismatic/models/{action_heads,
projectors}.py``, ``prismatic/vla/constants.py``, ``prismatic/training/train_utils.py``; from
``experiments/robot/openvla_utils.py`` the functions ``normalize_proprio`` and ``load_component_state_dict`` (their
source, cut out with ``ast``; the module itself imports tensorflow and the robot stack).

Stubs and shims (nothing else is changed or replaced):
* the package ``__init__.py`` files of ``prismatic``, ``prismatic.extern``, ``prismatic.extern.hf``,
  ``prismatic.models``, ``prismatic.vla``, ``prismatic.training`` are empty (upstream's import the training stack);
* ``diffusers.schedulers.scheduling_ddim.DDIMScheduler``: a placeholder class; ``action_heads.py`` imports it for
  ``DiffusionActionHead`` only, which the L1 recipe never builds;
* ``torchvision::nms`` / ``torchvision::qnms`` op schemas are defined before ``import torchvision``: the PyPI
  torchvision wheel is built against CUDA torch, its C ops cannot load beside the CPU torch wheel, and its import
  registers fake kernels for these two unguarded; no torchvision op is ever called;
* the tokenizer: dcvla's offline ``dcvla/assets/tokenizer.json`` (the Llama-2 one cannot be downloaded), its BPE
  merges rewritten as "a b" strings in a temporary copy, the format tokenizers 0.19 reads; the same tokenizer;
* tiny towers: ``configuration_prismatic.VISION_BACKBONE_TO_TIMM_ID["dinosiglip-vit-so-224px"]`` is pointed at two
  timm entry points registered here, which build timm's own ``vit_large_patch14_reg4_dinov2`` and
  ``vit_so400m_patch14_siglip_224`` with smaller ``embed_dim``/``depth``/``num_heads``/``mlp_ratio``.

How to run (from the repo root; never install timm or the fork into the project venv)::

    mkdir -p /tmp/tf-oft-src
    git --git-dir=/work/.mirror/moojink+transformers-openvla-oft/repo archive bc339d9 | tar -x -C /tmp/tf-oft-src
    python3.11 -m venv /tmp/oftvenv
    /tmp/oftvenv/bin/pip install torch==2.13.0 torchvision==0.28.0 timm==0.9.10 tokenizers==0.19.1 \\
        "huggingface-hub<1.0" "numpy<2" safetensors pillow
    /tmp/oftvenv/bin/pip install /tmp/tf-oft-src          # transformers 4.40.1 + the bidirectional SDPA commit
    /tmp/oftvenv/bin/python scripts/make_oft_parity_fixture.py --upstream /work/.mirror/moojink+openvla-oft/repo

(The git directories come from the ``fetch`` tool: github:moojink/openvla-oft, github:moojink/transformers-openvla-oft.)
Deterministic: fixed seeds, CPU only; a few seconds.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import math
import platform
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

UPSTREAM_COMMIT = "213c5ff"
FORK_COMMIT = "bc339d9"
SEED = 20250428
UNNORM_KEY = "libero_spatial_no_noops"
INSTRUCTION = "Put the black bowl on the plate"
STEP = 1000
UPSTREAM_FILES = [
    "prismatic/extern/hf/configuration_prismatic.py", "prismatic/extern/hf/modeling_prismatic.py",
    "prismatic/extern/hf/processing_prismatic.py", "prismatic/models/action_heads.py", "prismatic/models/projectors.py",
    "prismatic/vla/constants.py", "prismatic/training/train_utils.py",
]
UTILS_FILE, UTILS_FUNCTIONS = "experiments/robot/openvla_utils.py", ("normalize_proprio", "load_component_state_dict")
PACKAGES = ["prismatic", "prismatic/extern", "prismatic/extern/hf", "prismatic/models", "prismatic/vla", "prismatic/training"]

# Tiny dims: dcvla's `oft-tiny` towers; its Llama narrowed to 16 (the 32064-row embedding and lm_head dominate the size).
DINO_ID, SIGLIP_ID = "vit_large_patch14_reg4_dinov2", "vit_so400m_patch14_siglip_224"
DINO_OVERRIDES = dict(embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0)
SIGLIP_OVERRIDES = dict(embed_dim=48, depth=4, num_heads=2, mlp_ratio=2.0)
TEXT_CONFIG = dict(hidden_size=16, intermediate_size=44, num_hidden_layers=16, num_attention_heads=2,
                   num_key_value_heads=2, vocab_size=32064, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=32000, torch_dtype="bfloat16")
IMAGE_PROCESSOR = dict(use_fused_vision_backbone=True, image_resize_strategy="resize-naive",
                       input_sizes=[[3, 224, 224], [3, 224, 224]], interpolations=["bicubic", "bicubic"],
                       means=[[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]], stds=[[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]])
IMAGE_SIZE_IN = 128  # the processor resizes to 224 (bicubic), as for any image that is not already 224


# ----------------------------------------------------------------------------------------------- upstream code
def git_show(git_dir: Path, path: str) -> bytes:
    return subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{UPSTREAM_COMMIT}:{path}"],
                          check=True, capture_output=True).stdout


def install_upstream(git_dir: Path, root: Path) -> dict[str, str]:
    """Copy the upstream files unchanged under `root`, with empty package __init__s; returns {path: sha256}."""
    digests = {}
    for package in PACKAGES:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    for path in UPSTREAM_FILES:
        content = git_show(git_dir, path)
        (root / path).write_bytes(content)
        digests[path] = hashlib.sha256(content).hexdigest()
    utils = git_show(git_dir, UTILS_FILE).decode()
    digests[UTILS_FILE] = hashlib.sha256(utils.encode()).hexdigest()
    tree = ast.parse(utils)
    picked = [ast.get_source_segment(utils, node) for node in tree.body
              if isinstance(node, ast.FunctionDef) and node.name in UTILS_FUNCTIONS]
    assert len(picked) == len(UTILS_FUNCTIONS), "openvla_utils.py changed: functions not found"
    (root / "openvla_utils_picked.py").write_text(
        "from typing import Any, Dict\nimport numpy as np\nimport torch\n"
        "from prismatic.vla.constants import ACTION_PROPRIO_NORMALIZATION_TYPE, NormalizationType\n\n\n"
        + "\n\n\n".join(picked) + "\n")
    return digests


def install_stubs() -> None:
    """The diffusers placeholder and the torchvision op schemas (see the module docstring)."""
    ddim = types.ModuleType("diffusers.schedulers.scheduling_ddim")
    ddim.DDIMScheduler = type("DDIMScheduler", (), {"__doc__": "placeholder: only DiffusionActionHead uses it"})
    for name in ("diffusers", "diffusers.schedulers"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["diffusers.schedulers.scheduling_ddim"] = ddim
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    install_stubs.lib = lib  # keep the library alive


def register_tiny_towers(timm) -> list[str]:
    """timm entry points for the tiny towers: timm's own architectures with smaller widths and depths."""
    def make(name: str, real_id: str, overrides: dict):
        def entry(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
            return timm.create_model(real_id, pretrained=False, **kwargs, **overrides)
        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = "timm.models.vision_transformer"
        return timm.models.register_model(entry)

    make("oft_tiny_dinov2", DINO_ID, DINO_OVERRIDES)
    make("oft_tiny_siglip", SIGLIP_ID, SIGLIP_OVERRIDES)
    return ["oft_tiny_dinov2", "oft_tiny_siglip"]


# ---------------------------------------------------------------------------------------------- weights, data
@torch.no_grad()
def randomize_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every parameter a non-trivial value: Linear/Conv by fan-in, norms near 1, embeddings N(0, 1)."""
    for name, p in module.named_parameters():
        if p.ndim >= 2 and "embed_tokens" not in name and "pos_embed" not in name:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
        elif name.endswith("scale_factor"):  # LayerScale
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1 and name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:  # embeddings, cls / register tokens, position embeddings, attention-pool latent
            p.copy_((1.0 if "embed_tokens" in name else 0.5) * torch.randn(p.shape, generator=gen))
        p.copy_(p.to(torch.bfloat16).float())  # the stored values


def scene(rng: np.random.Generator, wrist: bool) -> np.ndarray:
    """A small synthetic tabletop (wrist: closer, other colours) as uint8 [128, 128, 3]."""
    n = IMAGE_SIZE_IN
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    img = np.stack([140 + 60 * yy, 110 + 40 * xx, 90 + 30 * yy * xx], -1)
    boxes = [(0.2, 0.5, 0.45, 0.8, (200, 40, 40)), (0.55, 0.3, 0.8, 0.55, (40, 90, 200))]
    for x0, y0, x1, y1, rgb in (boxes[::-1] if wrist else boxes):
        scale = 1.6 if wrist else 1.0
        sl = (slice(int(y0 * n), min(n, int(y1 * n * scale))), slice(int(x0 * n), min(n, int(x1 * n * scale))))
        img[sl] = rgb
    img += rng.normal(0.0, 6.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def dataset_statistics(rng: np.random.Generator) -> dict:
    """Upstream layout; action mask [True]*6 + [False]; proprio without a mask (as upstream saves it)."""
    def block(dim: int, scale: float) -> dict:
        mean = rng.normal(0.0, scale, dim)
        std = np.abs(rng.normal(scale, 0.2 * scale, dim)) + 1e-3
        f = lambda a: [float(np.float32(v)) for v in a]  # noqa: E731
        return dict(mean=f(mean), std=f(std), q01=f(mean - 2.3 * std), q99=f(mean + 2.3 * std),
                    min=f(mean - 3 * std), max=f(mean + 3 * std))

    out = {}
    for key, n in ((UNNORM_KEY, 52970), ("libero_object_no_noops", 66984)):
        action = block(7, 0.3)
        action["q01"][-1], action["q99"][-1] = 0.0, 1.0
        out[key] = {"action": action | {"mask": [True] * 6 + [False]}, "proprio": block(8, 0.2),
                    "num_transitions": n, "num_trajectories": n // 120}
    return out


# ------------------------------------------------------------------------------------------------------ main
def build_and_save(out: Path, timm_ids: list[str], stats: dict) -> None:
    """A random tiny OpenVLA-OFT written in the published layout (see the module docstring)."""
    from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig
    from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
    from prismatic.models.action_heads import L1RegressionActionHead
    from prismatic.models.projectors import ProprioProjector
    from prismatic.vla.constants import ACTION_DIM, PROPRIO_DIM

    config = OpenVLAConfig(vision_backbone_id="dinosiglip-vit-so-224px", llm_backbone_id="llama2-7b-pure",
                           arch_specifier="no-align+fused-gelu-mlp", use_fused_vision_backbone=True,
                           image_resize_strategy="resize-naive", text_config=TEXT_CONFIG, llm_max_length=2048,
                           pad_token_id=32000, pad_to_multiple_of=64, norm_stats=stats, n_action_bins=256)
    assert config.timm_model_ids == timm_ids
    config._attn_implementation = "sdpa"  # the fork changes the SDPA path only
    gen = torch.Generator().manual_seed(SEED)
    vla = OpenVLAForActionPrediction(config).eval()
    llm_dim = vla.llm_dim
    head = L1RegressionActionHead(input_dim=llm_dim, hidden_dim=llm_dim, action_dim=ACTION_DIM)  # get_action_head
    proprio = ProprioProjector(llm_dim=llm_dim, proprio_dim=PROPRIO_DIM)                           # get_proprio_projector
    for module in (vla, head, proprio):
        randomize_(module, gen)
    vla.to(torch.bfloat16).save_pretrained(out, safe_serialization=True, max_shard_size="2MB")  # merged_vla.save_pretrained
    (out / "dataset_statistics.json").write_text(json.dumps(stats, indent=2) + "\n")
    # finetune.py saves `module.state_dict()` of DDP-wrapped modules: every key starts with "module.".
    for name, module in (("action_head", head.to(torch.bfloat16)), ("proprio_projector", proprio)):
        torch.save({f"module.{k}": v for k, v in module.state_dict().items()}, out / f"{name}--{STEP}_checkpoint.pt")


@torch.no_grad()
def references(out: Path, repo_root: Path, rng: np.random.Generator, tmp: Path) -> dict[str, torch.Tensor]:
    """Reload as openvla_utils does and run get_vla_action's path in float32 (upstream casts inputs to bf16 on GPU)."""
    from openvla_utils_picked import load_component_state_dict, normalize_proprio
    from PIL import Image
    from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
    from prismatic.extern.hf.processing_prismatic import PrismaticImageProcessor, PrismaticProcessor
    from prismatic.models.action_heads import L1RegressionActionHead
    from prismatic.models.projectors import ProprioProjector
    from prismatic.vla.constants import ACTION_DIM, NUM_ACTIONS_CHUNK, PROPRIO_DIM
    from transformers import PreTrainedTokenizerFast
    from transformers.models.llama.modeling_llama import LlamaSdpaAttention

    vla = OpenVLAForActionPrediction.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    assert all(isinstance(layer.self_attn, LlamaSdpaAttention) for layer in vla.language_model.model.layers)
    vla.vision_backbone.set_num_images_in_input(2)
    vla.norm_stats = json.loads((out / "dataset_statistics.json").read_text())  # _load_dataset_stats
    head = L1RegressionActionHead(input_dim=vla.llm_dim, hidden_dim=vla.llm_dim, action_dim=ACTION_DIM).eval()
    head.load_state_dict(load_component_state_dict(str(out / f"action_head--{STEP}_checkpoint.pt")))
    proprio_projector = ProprioProjector(llm_dim=vla.llm_dim, proprio_dim=PROPRIO_DIM).eval()
    proprio_projector.load_state_dict(load_component_state_dict(str(out / f"proprio_projector--{STEP}_checkpoint.pt")))

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(old_format_tokenizer(repo_root, tmp)),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    processor = PrismaticProcessor(PrismaticImageProcessor(**IMAGE_PROCESSOR), tokenizer)
    images = [scene(rng, wrist=False), scene(rng, wrist=True)]
    stats = vla.norm_stats[UNNORM_KEY]["proprio"]
    state = np.asarray(stats["q01"]) + rng.uniform(-0.2, 1.2, 8) * (np.asarray(stats["q99"]) - np.asarray(stats["q01"]))
    # get_vla_action: prompt, processor per image, pixel_values concatenated, proprio normalised.
    prompt = f"In: What action should the robot take to {INSTRUCTION.lower()}?\nOut:"
    inputs = processor(prompt, Image.fromarray(images[0]).convert("RGB"))
    wrist = processor(prompt, Image.fromarray(images[1]).convert("RGB"))
    inputs["pixel_values"] = torch.cat([inputs["pixel_values"], wrist["pixel_values"]], dim=1)
    proprio = normalize_proprio(state, stats)
    seen = {}
    hook = vla.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    actions, action_hidden = vla.predict_action(
        **inputs, unnorm_key=UNNORM_KEY, do_sample=False, proprio=proprio, proprio_projector=proprio_projector,
        noisy_action_projector=None, action_head=head, use_film=False)
    hook.remove()
    input_ids = seen_input_ids(inputs["input_ids"])
    check_bidirectional(vla, seen["inputs_embeds"], action_hidden, input_ids.shape[1])
    features = vla.vision_backbone(inputs["pixel_values"])
    return {
        "image_third_person": torch.from_numpy(images[0]), "image_wrist": torch.from_numpy(images[1]),
        "state": torch.from_numpy(state), "proprio_normalized": torch.from_numpy(proprio),
        "input_ids": input_ids, "vision_features": features, "patch_embeddings": vla.projector(features),
        "proprio_token": proprio_projector(torch.Tensor(proprio).reshape(1, -1))[:, None],
        "action_hidden": action_hidden,
        "normalized_actions": head.predict_action(action_hidden).reshape(NUM_ACTIONS_CHUNK, ACTION_DIM),
        "actions": torch.from_numpy(np.asarray(actions, dtype=np.float64)),
    }


def old_format_tokenizer(repo_root: Path, tmp: Path) -> Path:
    """dcvla's offline tokenizer.json with its BPE merges as "a b" strings, the format tokenizers 0.19 reads (newer
    versions write [a, b] pairs); the same tokenizer."""
    content = json.loads((repo_root / "dcvla/assets/tokenizer.json").read_text())
    content["model"]["merges"] = [f"{a} {b}" for a, b in content["model"]["merges"]]
    path = tmp / "tokenizer-0.19.json"
    path.write_text(json.dumps(content))
    return path


def seen_input_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """The prompt ids predict_action runs on: the processor's, plus 29871 when it is not already last."""
    return input_ids if input_ids[0, -1] == 29871 else torch.cat([input_ids, torch.tensor([[29871]])], dim=1)


def check_bidirectional(vla, embeds: torch.Tensor, action_hidden: torch.Tensor, prompt_len: int) -> None:
    """The fork's attention is bidirectional: changing the last (STOP) embedding moves the action-slot states."""
    start = vla.vision_backbone.get_num_patches() * 2 + 1 + prompt_len - 1
    base = vla.language_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(base[:, start : start + 56], action_hidden, atol=1e-6)
    moved = embeds.clone()
    moved[:, -1] += 1.0
    after = vla.language_model(inputs_embeds=moved, output_hidden_states=True).hidden_states[-1]
    diff = (after[:, start : start + 56] - action_hidden).abs().max().item()
    assert diff > 1e-3, f"the STOP token does not reach the action slots (diff {diff}): attention is causal"
    print(f"[check] bidirectional: moving the STOP embedding moves the slot states by {diff:.3g}")


def write_readme(out: Path, refs: dict[str, torch.Tensor], meta: str) -> None:
    rows = "\n".join(f"| `{k}` | {str(v.dtype).removeprefix('torch.')} {list(v.shape)} |" for k, v in refs.items())
    (out / "README.md").write_text(f"""# oft_tiny: OpenVLA-OFT parity fixture (upstream moojink/openvla-oft reference)

Written by `scripts/make_oft_parity_fixture.py` (see its docstring for the venv, the pins and every stub). A random
tiny OpenVLA-OFT made, saved and run by upstream's own modules ({UPSTREAM_COMMIT}) on its transformers fork
({FORK_COMMIT}, bidirectional SDPA): towers as dcvla's `oft-tiny`, the Llama at width 16 (16 layers, 2 heads,
MLP 44, vocabulary 32064). Do not edit by hand; rerun the script (its output is byte-identical on the same versions).

| file | contents |
|---|---|
| `model-0000{{1,2}}-of-00002.safetensors`, `model.safetensors.index.json`, `config.json`, `generation_config.json` | the merged backbone, HF `save_pretrained` in bf16 (OpenVLA's key layout) |
| `action_head--{STEP}_checkpoint.pt` | L1 head state dict, bf16, keys `module.model.*` (DDP) |
| `proprio_projector--{STEP}_checkpoint.pt` | proprio projector state dict, float32, keys `module.fc{{1,2}}.*` |
| `dataset_statistics.json` | made-up `{UNNORM_KEY}` and `libero_object_no_noops`: action (mask [True]*6+[False]) and proprio |
| `reference.safetensors` | inputs and float32 references of `get_vla_action`'s path, below |

| reference | dtype, shape |
|---|---|
{rows}

`input_ids` are what `predict_action` ran on: dcvla's offline tokenizer's ids for the prompt plus Llama-2's 29871,
which `predict_action` appends. `actions` is upstream's un-normalised chunk (float64 as returned).

Generator: `{meta}`
""")


def main() -> None:
    repo_root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", type=Path, required=True, help="git dir of moojink/openvla-oft (from `fetch`)")
    ap.add_argument("--out", type=Path, default=repo_root / "tests" / "fixtures" / "oft_tiny")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.iterdir():
        old.unlink()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    install_stubs()
    import timm
    import transformers
    from transformers.models.llama.modeling_llama import LlamaSdpaAttention

    assert transformers.__version__ == "4.40.1" and timm.__version__ == "0.9.10", (transformers.__version__, timm.__version__)
    assert "is_causal=False" in inspect.getsource(LlamaSdpaAttention.forward), "transformers is not the OFT fork"
    with tempfile.TemporaryDirectory() as tmp:
        digests = install_upstream(args.upstream, Path(tmp))
        sys.path.insert(0, tmp)
        from prismatic.extern.hf import configuration_prismatic
        from prismatic.vla import constants

        assert (constants.NUM_ACTIONS_CHUNK, constants.ACTION_DIM, constants.PROPRIO_DIM) == (8, 7, 8)
        assert constants.ACTION_PROPRIO_NORMALIZATION_TYPE == constants.NormalizationType.BOUNDS_Q99
        configuration_prismatic.VISION_BACKBONE_TO_TIMM_ID["dinosiglip-vit-so-224px"] = register_tiny_towers(timm)
        rng = np.random.default_rng(SEED)
        build_and_save(args.out, configuration_prismatic.VISION_BACKBONE_TO_TIMM_ID["dinosiglip-vit-so-224px"],
                       dataset_statistics(rng))
        refs = references(args.out, repo_root, rng, Path(tmp))
    from safetensors.torch import save_file

    refs = {k: v.contiguous() if v.dtype in (torch.uint8, torch.int64, torch.float64) else v.float().contiguous()
            for k, v in refs.items()}
    meta = (f"scripts/make_oft_parity_fixture.py seed={SEED} openvla-oft={UPSTREAM_COMMIT} fork={FORK_COMMIT} "
            f"torch={torch.__version__} timm={timm.__version__} transformers={transformers.__version__} "
            f"python={platform.python_version()} instruction={INSTRUCTION!r} unnorm_key={UNNORM_KEY} "
            f"upstream_sha256={json.dumps(digests, sort_keys=True)}")
    save_file(refs, str(args.out / "reference.safetensors"), metadata={"generator": meta})
    for name, t in refs.items():
        print(f"  {name:20s} {str(tuple(t.shape)):16s} {str(t.dtype):14s} max|v|={t.double().abs().max():.4g}")
    write_readme(args.out, refs, meta)
    total = sum(p.stat().st_size for p in args.out.iterdir())
    for p in sorted(args.out.iterdir()):
        print(f"  {p.name:45s} {p.stat().st_size:>10,d} bytes")
    print(f"  total {total:,d} bytes")


if __name__ == "__main__":
    main()
