"""The per-frame engine stays lean: host-device synchronisations of one non-keyframe step, counted as
`benchmarks/host_syncs.py` counts them (deterministic, so a test), at most its LIMIT for every method."""

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
def counted_frames():
    """What the script counts on: the first frames of the first shipped episode, center-cropped."""
    episode = load_episode(list_episodes()[0])
    return [policy_input(f) for f in host_syncs.first_frames(episode, host_syncs.COUNTED_FRAME + 1)], episode.instruction


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


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_non_keyframe_step_makes_at_most_the_limit(base, counted_frames, method):
    frames, instruction = counted_frames
    result = host_syncs.count_method(base, method, frames, instruction, sites=True)
    assert not result["keyframe"]
    assert result["total"] <= host_syncs.LIMIT, result["by_site"]
    if METHODS[method].unified_selector:
        assert result["reused_patches"] > 0, "the counted step must exercise reuse"
    if METHODS[method].llm != "full":
        assert result["reused_tokens"] > 0, "the counted step must exercise LLM reuse"
