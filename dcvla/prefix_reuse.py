"""Cross-inference K/V reuse in flow-matching VLAs (pi0, pi0.5, SmolVLA): the registry of modes and gates, their
config and the gates' rules (`dcvla.flow_policy.FlowPolicy` runs them).

Every inference embeds its images (the gates need them), then a gate decides whether the mode's spans may take
their K/V from the episode's store instead of being computed. Every family lays out three spans (`SPANS`); where
each one lives is the family's (its policy module tables it):

| span   | pi0                                 | pi0.5                              | SmolVLA                              |
|--------|-------------------------------------|------------------------------------|--------------------------------------|
| vision | the present cameras' image tokens   | the same                           | the same (64 per camera after the pixel shuffle) |
| text   | the prompt                          | the prompt's words                 | the prompt                           |
| state  | the state token's K/V in the expert | the state's bin tokens in the prompt | the state token, last in the prefix |

| mode         | spans reused when the gate opens               |
|--------------|------------------------------------------------|
| none         | nothing (the no-reuse reference)               |
| full         | vision + text + state                          |
| vision_only  | vision                                         |
| state_only   | state                                          |
| text_fixed   | text                                           |
| layer_wise   | vision, in prefix layers >= layer_wise_from    |
| synchronized | vision + text + state, under the synchronized gate |

Gates (`ReuseConfig.gate`; "" = the mode's own: synchronized for `synchronized`, cosine otherwise):

| gate         | opens when                                                                               |
|--------------|------------------------------------------------------------------------------------------|
| cosine       | cosine similarity of the image tokens to the reference inference's >= threshold (the report's) |
| synchronized | that, and the normalised state's cosine similarity >= threshold                           |
| max_age      | the store's reused spans were computed fewer than `max_age` inferences ago (a cache interval: 1 never reuses, 2 every other inference) |
| pixel_mae    | mean |pixel change| (in [0, 1]) of every camera since the reference inference <= pixel_threshold |
| phase_aware  | the cosine gate, with `phase_threshold` instead of `threshold` near a grasp or a place: when the gripper command (action dim 6) of the previous chunk's executed actions changes sign, or differs in sign from the chunk before |

The reference is the previous inference (`compare_to="previous"`) or the one that last computed the spans
(`"anchor"`). A reused span's rows are not computed in the layers where they are reused (the rows recomputed attend
to the stale K/V wherever the prefix's mask lets them; layer_wise recomputes the vision rows below
`layer_wise_from`). Only spans laid out as the stored ones can reuse: pi0.5's state bins can change the prompt's
token count: then the prompt's spans (text, state) moved and are computed afresh, while the image tokens, first in
the prefix, keep their positions and may still reuse (their K/V carry over). Cosine similarity never
exceeds 1, so a threshold above 1 never reuses and every inference is the no-reuse computation exactly. The store is
per episode: `reset()` empties it and the first inference computes everything.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

SPANS = ("vision", "text", "state")  # what reuse modes name: the image tokens, the task prompt, the robot state
REPLAN_STEPS = 5  # LIBERO clients (openpi, lerobot): actions executed from each chunk before the next inference


@dataclass(frozen=True)
class ReuseMode:
    spans: tuple[str, ...]           # spans whose K/V are reused when the gate opens
    gate: str = "cosine"             # the mode's own gate
    upper_layers_only: bool = False  # reuse only in prefix layers >= layer_wise_from (layer_wise)


MODES: dict[str, ReuseMode] = {
    "none": ReuseMode(()),
    "full": ReuseMode(SPANS),
    "vision_only": ReuseMode(("vision",)),
    "state_only": ReuseMode(("state",)),
    "text_fixed": ReuseMode(("text",)),
    "layer_wise": ReuseMode(("vision",), upper_layers_only=True),
    "synchronized": ReuseMode(SPANS, gate="synchronized"),
}
GATES = ("cosine", "synchronized", "max_age", "pixel_mae", "phase_aware")
COMPARE_TO = ("previous", "anchor")
LIBERO_ACTION_DIM = 7  # LIBERO executes the first 7 action dims
GRIPPER = 6  # LIBERO's gripper command: the last of the 7 executed action dims


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ReuseConfig:
    """Everything that decides what the policy reuses. Flat; the stability_cliff notebook mirrors it."""

    mode: str = "full"                 # a name from MODES
    gate: str = ""                     # a name from GATES ("" = the mode's own)
    threshold: float = 0.985           # cosine / synchronized / phase_aware away from contact (> 1: never)
    phase_threshold: float = 0.995     # phase_aware near a grasp or a place
    max_age: int = 2                   # max_age: inferences one computation may serve (1: never reuse)
    pixel_threshold: float = 0.02      # pixel_mae: mean |pixel change| in [0, 1] at or below which reuse
    compare_to: str = "previous"       # "previous": the last inference's inputs; "anchor": the last computation's
    layer_wise_from: int | None = None  # layer_wise: first prefix layer whose vision K/V are reused (None: depth // 2)
    replan_steps: int = REPLAN_STEPS   # closed loop: actions of each chunk executed before the next inference

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"ReuseConfig.mode: unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.gate and self.gate not in GATES:
            raise ValueError(f"ReuseConfig.gate: unknown gate {self.gate!r}; known: {', '.join(GATES)} ('' = the mode's)")
        for name in ("threshold", "phase_threshold"):
            value = getattr(self, name)
            if not _real(value) or value < -1:
                raise ValueError(f"ReuseConfig.{name} must be a finite cosine similarity >= -1 (> 1 never reuses), got {value!r}")
        if not _real(self.pixel_threshold) or self.pixel_threshold < 0:
            raise ValueError(f"ReuseConfig.pixel_threshold must be a mean pixel change >= 0 (in [0, 1]), got {self.pixel_threshold!r}")
        if not isinstance(self.max_age, int) or self.max_age < 1:
            raise ValueError(f"ReuseConfig.max_age must be an int >= 1 (1 never reuses), got {self.max_age!r}")
        if self.compare_to not in COMPARE_TO:
            raise ValueError(f"ReuseConfig.compare_to must be one of {COMPARE_TO}, got {self.compare_to!r}")
        if self.layer_wise_from is not None and self.layer_wise_from < 0:
            raise ValueError(f"ReuseConfig.layer_wise_from must be >= 0, got {self.layer_wise_from}")
        if self.replan_steps < 1:
            raise ValueError(f"ReuseConfig.replan_steps must be >= 1, got {self.replan_steps}")

    @property
    def gate_name(self) -> str:
        return self.gate or MODES[self.mode].gate


def gate_opens(config: ReuseConfig, sims: dict, age: int) -> bool:
    """The rule of `config.gate_name`, given what the policy measured against the reference (`sims`: vision and state
    cosine similarity, pixel change, the contact detector) and the age of the stored computation (inferences)."""
    kind = config.gate_name
    if kind == "cosine":
        return sims["vision"] >= config.threshold
    if kind == "synchronized":
        return sims["vision"] >= config.threshold and sims["state"] >= config.threshold
    if kind == "max_age":
        return age < config.max_age
    if kind == "pixel_mae":
        return sims["pixels"] <= config.pixel_threshold
    return sims["vision"] >= (config.phase_threshold if sims["contact"] else config.threshold)  # phase_aware


def near_contact(gripper: list[np.ndarray]) -> bool:
    """phase_aware's detector over the executed gripper commands of each inference so far: the last inference's
    change sign, or their sign differs from the inference before's."""
    if not gripper:
        return False
    last = gripper[-1]
    return len(set(np.sign(last))) > 1 or (len(gripper) > 1 and np.sign(last[0]) != np.sign(gripper[-2][-1]))
