"""One vision tower's dimensions, as the published (timm) model describes it; both families' towers use it.

OpenVLA runs a DINOv2 and a SigLIP tower up to their second-to-last block; Pi0's PaliGemma runs a SigLIP tower
whole. The normalisation constants are the towers' own.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ViTConfig:
    """One vision tower, described as the published (timm) model is: `depth` counts every block."""

    name: str                         # "dino" or "siglip": the tower's name in datasets and FLOP tables
    hidden_size: int
    depth: int                        # blocks in the published model; only blocks [0, depth - 2] run
    num_heads: int
    mlp_dim: int
    num_register_tokens: int = 0      # DINOv2: 4 registers after the cls token
    class_token: bool = False         # DINOv2: True (no position embedding for it)
    layerscale: bool = False          # DINOv2: LayerScale after attention and MLP
    hidden_act: str = "gelu"          # exact GELU in both towers (see _siglip)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.depth < 2:
            raise ValueError(f"ViTConfig.depth must be >= 2 (features come from the second-to-last block), got {self.depth}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_register_tokens

    @property
    def grid(self) -> int:
        """Patches a side (OpenVLA's towers: 224 // 14 = 16)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def num_layers_run(self) -> int:
        """Blocks that run: features are the output of block depth-2, so the last block is never built."""
        return self.depth - 1
