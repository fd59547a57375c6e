"""The per-episode K/V store and the per-layer row plan every family's cache shares."""

import numpy as np
import torch

from dcvla.flops import LayerWork
from dcvla.kv_store import KVStore, LayerPlan


def store(queries: bool = False) -> KVStore:
    # 3 layers, 6 slots, 4 query heads over 2 K/V heads, head_dim 8
    return KVStore(3, 6, 4, 2, 8, torch.float32, torch.device("cpu"), store_queries=queries)


def test_a_new_store_is_empty():
    s = store()
    assert s.num_slots == 6 and s.keys.shape == (3, 2, 6, 8) and s.queries is None
    assert (s.computed_at == -1).all() and not s.is_filled(0, torch.tensor([0]))
    assert (s.staleness(4) == 5).all()  # never computed: frame + 1
    assert store(queries=True).queries.shape == (3, 4, 6, 8)


def test_update_writes_exactly_the_given_slots_of_one_layer():
    s = store(queries=True)
    slots = torch.tensor([1, 4])
    k, v, q = torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(4, 2, 8)
    s.update(1, slots, k, v, frame=7, q=q)
    assert torch.equal(s.keys[1][:, slots], k) and torch.equal(s.values[1][:, slots], v)
    assert torch.equal(s.queries[1][:, slots], q)
    others = torch.tensor([0, 2, 3, 5])
    assert (s.keys[1][:, others] == 0).all() and (s.values[1][:, others] == 0).all()  # neighbours untouched
    assert (s.keys[[0, 2]] == 0).all()  # other layers untouched
    assert s.computed_at[1].tolist() == [-1, 7, -1, -1, 7, -1] and (s.computed_at[[0, 2]] == -1).all()
    assert s.is_filled(1, slots) and not s.is_filled(1, torch.tensor([1, 2]))
    assert s.staleness(9)[1].tolist() == [10, 2, 10, 10, 2, 10]


def test_update_with_no_slots_changes_nothing():
    s = store()
    s.update(0, torch.tensor([], dtype=torch.long), torch.zeros(2, 0, 8), torch.zeros(2, 0, 8), frame=3)
    assert (s.computed_at == -1).all()


def test_layer_plan_full_and_its_work():
    plan = LayerPlan.full(5)
    assert plan.rows.tolist() == [0, 1, 2, 3, 4] and plan.kv_fresh.all() and plan.q_fresh.all()
    assert plan.work(5) == LayerWork(5, 5, 5)
    partial = LayerPlan(torch.tensor([0, 2, 3]), torch.tensor([True, False, True]), torch.tensor([True, True, True]))
    assert partial.work(9) == LayerWork(q_rows=3, kv_rows=2, keys=9)


def test_a_plan_from_the_host_has_its_indices_without_reading_the_device():
    rows = np.array([0, 2, 3, 5, 6])
    kv_fresh = np.array([True, False, True, False, True])
    q_fresh = kv_fresh.copy()
    plan = LayerPlan.from_host(rows, kv_fresh, q_fresh, "cpu")
    assert plan.rows.tolist() == rows.tolist() and plan.kv_fresh.tolist() == kv_fresh.tolist()
    assert plan.n_kv == plan.n_q == 3 and plan.work(9) == LayerWork(q_rows=5, kv_rows=3, keys=9)
    assert plan.kv_index.tolist() == [0, 2, 4] and plan.kv_slots.tolist() == [0, 3, 6]
    assert plan.q_cached_index.tolist() == [1, 3] and plan.q_cached_slots.tolist() == [2, 5]
    assert plan.count_below(4) == 3 and plan.count_below(4, fresh_kv_only=True) == 2


def test_a_plan_built_on_the_device_reads_it_once_and_agrees():
    rows, kv_fresh = torch.tensor([0, 2, 3]), torch.tensor([True, False, True])
    plan = LayerPlan(rows, kv_fresh, torch.ones(3, dtype=torch.bool))
    host = LayerPlan.from_host(rows.numpy(), kv_fresh.numpy(), np.ones(3, bool), "cpu")
    assert plan.q_index is None and plan.q_cached_index is None and host.q_index is None  # every Q fresh
    assert torch.equal(plan.kv_index, host.kv_index) and torch.equal(plan.kv_slots, host.kv_slots)
    full = LayerPlan.full(4)
    assert full.kv_index is None and full.kv_slots is full.rows and full.n_kv == 4
