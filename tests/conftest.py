import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return FIXTURES / "openvla_tiny"


@pytest.fixture(scope="session")
def base():
    """The tiny preset with random weights, shared by every test that steps a policy."""
    from dcvla.policy import VLAPolicy

    return VLAPolicy.from_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def make_policy(base):
    """policy(**CacheConfig fields) -> a CachedPolicy on the shared tiny model."""
    from dcvla.methods import CacheConfig, CachedPolicy

    return lambda **config: CachedPolicy(base.model, base.processor, CacheConfig(**config))


def _shipped(suite: str, n: int):
    from dcvla.libero.episodes import list_episodes, load_episode

    ep = load_episode(list_episodes(suite=suite)[0])
    return ep.frames[:n], ep.instruction


@pytest.fixture(scope="session")
def spatial_episode():
    """The first 8 frames and the instruction of the first shipped libero_spatial episode."""
    return _shipped("libero_spatial", 8)


@pytest.fixture(scope="session")
def object_episode():
    """The first 5 frames and the instruction of the first shipped libero_object episode."""
    return _shipped("libero_object", 5)
