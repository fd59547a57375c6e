"""`dcvla.openvla.loading`: a preset or a checkpoint names its model (OpenVLA or OpenVLA-OFT), and the studies'
vanilla policy is built from it on the asked dtype."""

import pytest
import torch

from dcvla.openvla import CachedPolicy, get_preset, random_model
from dcvla.openvla.checkpoint import save_pretrained as save_openvla
from dcvla.openvla.checkpoint import is_oft_checkpoint
from dcvla.openvla.loading import check_preset, policy_type, vanilla_policy
from dcvla.openvla.oft import OFTCachedPolicy
from dcvla.openvla.oft import random_model as random_oft
from dcvla.openvla.oft import save_pretrained as save_oft
from dcvla.openvla.oft.config import get_preset as oft_preset
from dcvla.studies.common import StudyConfig, base_policy


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    oft = random_oft(oft_preset("oft-tiny"), seed=3)
    return {"oft": (save_oft(oft, root / "oft", dtype=None), oft),
            "openvla": (save_openvla(random_model(get_preset("tiny"), seed=3), root / "openvla", dtype=None), None)}


def test_presets_name_their_model():
    assert policy_type("oft-tiny") is OFTCachedPolicy and policy_type("openvla-oft-7b") is OFTCachedPolicy
    assert policy_type("small") is CachedPolicy and policy_type("openvla-7b") is CachedPolicy
    with pytest.raises(ValueError, match="unknown preset 'oft-huge'.*OpenVLA-OFT presets: .*oft-small"):
        check_preset("oft-huge")
    with pytest.raises(ValueError, match="StudyConfig.preset: unknown preset 'smal'"):
        StudyConfig(preset="smal")


def test_a_checkpoint_is_oft_when_it_holds_the_heads(checkpoints, tmp_path):
    oft_dir, openvla_dir = checkpoints["oft"][0], checkpoints["openvla"][0]
    assert is_oft_checkpoint(oft_dir) and not is_oft_checkpoint(openvla_dir) and not is_oft_checkpoint(tmp_path / "none")
    assert policy_type(checkpoint=str(oft_dir)) is OFTCachedPolicy
    assert policy_type(checkpoint=str(openvla_dir)) is CachedPolicy
    # OpenVLA's loader would read the backbone alone and drop the heads: it refuses, naming the loader to use
    with pytest.raises(ValueError, match=f"{oft_dir} is an OpenVLA-OFT checkpoint.*OFTCachedPolicy.from_pretrained"):
        CachedPolicy.from_pretrained(oft_dir)


def test_the_studies_load_an_oft_checkpoint_in_the_asked_dtype(checkpoints):
    directory, model = checkpoints["oft"]
    policy = base_policy(StudyConfig(checkpoint=str(directory), dtype="bfloat16"))
    assert isinstance(policy, OFTCachedPolicy) and policy.name == "vanilla" and policy.model.dtype == torch.bfloat16
    loaded = policy.model.action_head.state_dict()
    for key, value in model.action_head.state_dict().items():
        assert torch.equal(loaded[key], value.to(torch.bfloat16)), key
    fp32 = vanilla_policy(checkpoint=directory)
    assert fp32.model.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(fp32.model.proprio_projector.parameters(), model.proprio_projector.parameters()))


def test_a_random_preset_is_placed_with_float32_rotary_frequencies():
    policy = vanilla_policy("oft-tiny", dtype=torch.bfloat16)
    assert isinstance(policy, OFTCachedPolicy) and policy.model.dtype == torch.bfloat16
    inv_freq = [b for name, b in policy.model.named_buffers() if name.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
