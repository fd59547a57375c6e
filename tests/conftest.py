import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, kernels included
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return FIXTURES / "openvla_tiny"


@pytest.fixture(scope="session")
def base():
    """The tiny preset with random weights behind the vanilla method, shared by every test that steps a policy.
    `base.model.reference_action(input_ids, pixel_values)` is the plain transformers forward."""
    from dcvla.openvla import CacheConfig, CachedPolicy

    return CachedPolicy.from_preset("tiny", seed=0, config=CacheConfig("vanilla"))


@pytest.fixture(scope="session")
def make_policy(base):
    """policy(**CacheConfig fields) -> a CachedPolicy on the shared tiny model."""
    from dcvla.openvla import CacheConfig

    return lambda **config: base.with_config(CacheConfig(**config))


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


@pytest.fixture(scope="session")
def pi0():
    """The shared pi0-tiny model (random weights) behind a no-reuse policy; other modes come from `with_config`."""
    from dcvla.pi0 import Pi0Policy, ReuseConfig

    return Pi0Policy.from_preset("pi0-tiny", seed=0, config=ReuseConfig(mode="none"))


@pytest.fixture(scope="session")
def pi05():
    """The shared pi05-tiny model (random weights; the state's bins in the prompt) behind a no-reuse policy."""
    from dcvla.pi0 import Pi0Policy, ReuseConfig

    return Pi0Policy.from_preset("pi05-tiny", seed=0, config=ReuseConfig(mode="none"))


@pytest.fixture(scope="session")
def smolvla():
    """The shared smolvla-tiny model (random weights; the state token last in the prefix) behind a no-reuse policy."""
    from dcvla.prefix_reuse import ReuseConfig
    from dcvla.smolvla import SmolVLAPolicy

    return SmolVLAPolicy.from_preset("smolvla-tiny", seed=0, config=ReuseConfig(mode="none"))


@pytest.fixture(scope="session")
def pi0_clip():
    """Frames 0, 5, .., 20 of the first shipped libero_spatial episode (uncropped): [agent view, wrist view] each,
    their states, the task."""
    from dcvla.libero.episodes import list_episodes, load_episode
    from dcvla.libero.protocol import policy_input

    ep = load_episode(list_episodes(suite="libero_spatial")[0])
    idx = range(0, 25, 5)
    images = [[policy_input(ep.frames[i], crop=False), policy_input(ep.wrist_frames[i], crop=False)] for i in idx]
    return images, [ep.states[i] for i in idx], ep.instruction


@pytest.fixture(scope="session")
def record():
    """record(policy, frames, instruction, **recorder_kwargs) -> the in-memory dataset of one episode."""
    from dcvla.recording import recorder_for

    def run(pol, frames, instruction, **kw):
        pol.reset()
        with recorder_for(pol, **kw) as rec:
            for frame in frames:
                pol.step(frame, instruction)
        return rec.to_dataset()

    return run
