"""The ViT K/V cache on a real LIBERO frame (tiny preset): the block loop against transformers' own tower, the
row plan, and reuse from a store against a full forward."""

import pytest
import torch

from dcvla.openvla.vit_cache import new_tower_store, run_tower, tower_plan

ATOL = 1e-5  # fp32; only the summation order differs from transformers' forward


@pytest.fixture(scope="module")
def towers(base, spatial_episode):
    """(tower, its pixels of frame 0, of frame 0 mirrored) for both towers."""
    frames, instruction = spatial_episode
    px0 = base.processor(frames[0], instruction)[1]
    px4 = px0.flip(-1)
    return [(t, a, b) for t, a, b in zip(base.model.vision_backbone.towers.values(), px0.split([3, 3], 1), px4.split([3, 3], 1))]


def static_mask() -> torch.Tensor:
    static = torch.zeros(256, dtype=torch.bool)
    static[::3] = True  # every third patch reused, the rest recomputed
    return static


@torch.no_grad()
def test_engine_without_reuse_equals_the_transformers_tower(towers):
    for tower, px, _ in towers:
        out = run_tower(tower, px, tower_plan(tower, None, True), None, 0)
        assert out.patches.tolist() == list(range(256))
        assert (out.features - tower(px)).abs().max() < ATOL, tower.cfg.name


def test_tower_plan_rows_and_fresh_kv(towers):
    static = static_mask()
    for tower, _, _ in towers:
        prefix = tower.num_prefix_tokens
        full = tower_plan(tower, None, False)
        assert full.rows.numel() == prefix + 256 and full.kv_fresh.all()
        assert tower_plan(tower, torch.zeros(256, dtype=torch.bool), False).rows.numel() == prefix + 256
        kept = tower_plan(tower, static, keep_static_rows=True)  # every row computed, static ones take stored K/V
        assert kept.rows.numel() == prefix + 256 and kept.q_fresh.all()
        assert torch.equal(kept.kv_fresh, torch.cat([torch.ones(prefix, dtype=torch.bool), ~static]))
        dropped = tower_plan(tower, static, keep_static_rows=False)  # static rows not computed at all
        assert dropped.rows.tolist() == list(range(prefix)) + [prefix + j for j in range(256) if not static[j]]
        assert dropped.kv_fresh.all() and dropped.q_fresh.all()


def test_tower_plan_from_a_host_array_is_the_same_plan(towers):
    static = static_mask()
    for tower, _, _ in towers:
        for keep in (True, False):
            a, b = tower_plan(tower, static, keep), tower_plan(tower, static.numpy(), keep, "cpu")
            assert torch.equal(a.rows, b.rows) and torch.equal(a.kv_fresh, b.kv_fresh) and a.n_kv == b.n_kv
            assert a.n_kv == tower.num_prefix_tokens + int((~static).sum())


@torch.no_grad()
@pytest.mark.parametrize("keep_static_rows", [True, False])
def test_reuse_of_the_same_frame_is_the_full_forward(towers, keep_static_rows):
    """Fill the store with a frame, then run the same frame reusing a third of the patches: the features are the
    full forward's, and the static patches' store entries are those of the first frame. Filled from another frame,
    the same plan gives other features: the stored K/V are really read."""
    static = static_mask()
    for tower, px, other in towers:
        name, prefix = tower.cfg.name, tower.num_prefix_tokens
        expected = tower(px)
        plan = tower_plan(tower, static, keep_static_rows)
        for first, same in ((px, True), (other, False)):
            store = new_tower_store(tower, torch.float32, torch.device("cpu"))
            run_tower(tower, first, tower_plan(tower, None, True), store, 0)
            before = store.keys.clone()
            out = run_tower(tower, px, plan, store, 1)
            diff = (out.features - expected[:, out.patches]).abs().max()
            assert (diff < ATOL) if same else (diff > 1e-3), (name, same, float(diff))
            slots = prefix + static.nonzero().flatten()
            assert torch.equal(store.keys[:, :, slots], before[:, :, slots]) and (store.computed_at[:, slots] == 0).all()
            assert (store.computed_at[:, prefix + (~static).nonzero().flatten()] == 1).all()
        assert out.patches.numel() == (256 if keep_static_rows else int((~static).sum()))
        assert [w.kv_rows for w in out.work] == [prefix + int((~static).sum())] * tower.cfg.num_layers_run


def test_a_plan_that_reuses_needs_a_store(towers):
    tower, px, _ = towers[0]
    with pytest.raises(ValueError, match="a plan that reuses K/V needs a store"):
        run_tower(tower, px, tower_plan(tower, static_mask(), True), None, 0)
