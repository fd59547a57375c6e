"""The per-frame engine stays lean: host-device synchronisations of one non-keyframe step, counted as
`benchmarks/host_syncs.py` counts them (deterministic, so a test), at most its LIMIT for every method, on OpenVLA
and on OpenVLA-OFT (two images, two selectors)."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

from dcvla.libero.episodes import list_episodes, load_episode
from dcvla.libero.protocol import policy_input
from dcvla.openvla import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
host_syncs = importlib.import_module("host_syncs")


@pytest.fixture(scope="module")
def episode():
    """What the script counts on: the first shipped episode (its first frames center-cropped)."""
    return load_episode(list_episodes()[0])


@pytest.fixture(scope="module")
def oft_base():
    return host_syncs.base_policy("oft-tiny")


def test_the_counter_counts_each_kind_of_sync_once():
    t = torch.arange(6.0)
    mask = t > 2

    def work():
        bool(mask.any())     # is_nonzero (around item): 1
        t[mask]              # index with a bool mask (nonzero underneath): 1
        int(t[0])            # item: 1
        t.tolist()           # host read: 1
        t.cpu()              # host read: 1
        torch.equal(t, t)    # equal: 1
        t.unique()           # unique: 1
        t.masked_select(mask)  # masked_select: 1
        t[torch.tensor([0, 2])]  # index with a long tensor: 0
        torch.nonzero_static(mask, size=3)  # a static size: 0
        return "done"

    result = host_syncs.count(work)
    assert result["result"] == "done"
    assert result["total"] == 8, result["by_op"]


@pytest.mark.parametrize("family", ["openvla", "openvla-oft"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_non_keyframe_step_makes_at_most_the_limit(base, oft_base, episode, method, family):
    policy = base if family == "openvla" else oft_base
    steps = host_syncs.step_inputs(policy, episode, host_syncs.COUNTED_FRAME + 1, policy_input)
    result = host_syncs.count_method(policy, method, steps, sites=True)
    assert not result["keyframe"]
    assert result["total"] <= host_syncs.LIMIT, result["by_site"]
    if METHODS[method].unified_selector:
        assert result["reused_patches"] > 0, "the counted step must exercise reuse"
    if METHODS[method].llm != "full":
        assert result["reused_tokens"] > 0, "the counted step must exercise LLM reuse"
