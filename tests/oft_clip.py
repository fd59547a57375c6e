"""What the OpenVLA-OFT policy tests share: four steps of a shipped spatial episode (both views and the state) and
running a policy over steps."""

import numpy as np
import pytest

from dcvla.libero.episodes import list_episodes, load_episode
from dcvla.libero.protocol import policy_input


@pytest.fixture(scope="module")
def clip():
    """4 steps: ([third-person, wrist], state) each, and the instruction."""
    spatial = load_episode(list_episodes(suite="libero_spatial")[0])
    steps = [([policy_input(spatial.frames[i]), policy_input(spatial.wrist_frames[i])], spatial.states[i])
             for i in range(4)]
    return steps, spatial.instruction


def run(pol, steps, instruction) -> list[np.ndarray]:
    """The normalised chunks of `pol` over `steps`, from a reset."""
    pol.reset()
    for images, state in steps:
        pol.step(images, instruction, state)
    return [r.prediction.normalized for r in pol.records]
