"""The mechanism equivalence study: hypotheses H0-H4 of the design, tested on recorded runs."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..openvla import METHODS, CachedPolicy
from ..openvla.record import action_kl
from ..devices import parse_dtype
from .common import StudyConfig, base_policy, by_episode, record_runs

ALL_DYNAMIC = {"keyframe_interval": 1, "top_k_static": 0}  # nothing reused by either selector
EQUIVALENCE_TOLERANCE = 1e-4  # max |difference| of action-token logits that counts as "equal" in float32
LOGIT_SCALE = 20.0            # the action logits' magnitude (a trained OpenVLA's and the random presets': 4-20)
ROUNDING_MARGIN = 4           # reassociated sums over a changed GEMM shape round a few ulps apart


def equivalence_tolerance(dtype: str) -> float:
    """Max |logit diff| that counts as "equal" for a model run in `dtype`: 1e-4 in float32; in a 16-bit dtype a
    few ulps of a logit of magnitude LOGIT_SCALE (bfloat16: 0.625, float16: 0.078). Dropping or adding rows changes
    GEMM shapes, and on a GPU that changes the rounding, so an fp32 tolerance would call equal computations unequal."""
    if dtype == "float32":
        return EQUIVALENCE_TOLERANCE
    return ROUNDING_MARGIN * torch.finfo(parse_dtype(dtype)).eps * LOGIT_SCALE


def _compare(a: xr.Dataset, b: xr.Dataset) -> dict[str, float]:
    return {
        "max |logit diff|": float(np.abs(a.action_logits.astype(np.float32) - b.action_logits.astype(np.float32)).max()),
        "token mismatch rate": float((a.action_tokens != b.action_tokens).mean()),
        "max |action diff|": float(np.abs(a.action - b.action).max()),
        "mean action KL": float(action_kl(a, b).mean()),
    }


def equivalence_tests(config: StudyConfig, base: CachedPolicy | None = None) -> pd.DataFrame:
    """H0-H4 of the design, measured on the configured shipped episodes.

    Returns:
        One row per comparison: hypothesis, the two runs, max |logit diff| (action tokens), token mismatch
        rate, max |action diff|, mean action-token KL, and a verdict computed from the numbers.
    """
    runs, cached, faithful = _record(config, base or base_policy(config))
    episodes_ = sorted({ep for _, ep in cached})

    def pairs(left: dict, a: str, right: dict, b: str) -> list[tuple[xr.Dataset, xr.Dataset]]:
        return [(left[(a, ep)], right[(b, ep)]) for ep in episodes_]

    tol = equivalence_tolerance(config.dtype)
    rows = [_row("H0 all dynamic = vanilla", method, "vanilla", pairs(runs, method, runs, "vanilla"), True, tolerance=tol)
            for method in METHODS if method != "vanilla"]
    rows += [
        _row("H1 LLM: Q reuse = dropping", "dual_cache (faithful)", "dual_cache",
             pairs(faithful, "dual_cache", cached, "dual_cache"), True, tolerance=tol),
        _row("H1 LLM: Q recompute = dropping", "dual_cache_llm_kv", "dual_cache",
             pairs(cached, "dual_cache_llm_kv", cached, "dual_cache"), True,
             "the static rows the ViT computes for it are unread too (H2)", tol),
        _row("H3 stale ViT K/V vs fresh ViT (same mask)", "dual_cache", "llm_kqv_only",
             pairs(cached, "dual_cache", cached, "llm_kqv_only"), None,
             "difference = the ViT's stale K/V reaching the dynamic patches", tol),
        _row("H3 dual_cache vs TTF + VLA-Cache (as published)", "dual_cache", "ttf_vla_cache",
             pairs(cached, "dual_cache", cached, "ttf_vla_cache"), None,
             "masks: dual_cache one unified mask (pixel test of either tower, or attention) for both towers' K/V and "
             "the LLM's Q/K/V; ttf_vla_cache TTF's own mask per tower on the towers' outputs, VLA-Cache's selection "
             "and layer schedule (130 static, 120 most attended removed) in the LLM", tol),
    ]
    rows += [_row("H4 drift from vanilla", method, "vanilla", pairs(cached, method, cached, "vanilla"), None,
                  "consistent reuse (vision + conditioned LLM rows)" if method == "dual_cache" else "stale vision, fresh LLM", tol)
             for method in ("dual_cache", "vit_kv_only")]
    table = pd.DataFrame(rows)
    h4 = table[table.hypothesis == "H4 drift from vanilla"].set_index("compared")["mean action KL"]
    consistent, fresh = h4["dual_cache vs vanilla"], h4["vit_kv_only vs vanilla"]
    verdict = "holds" if consistent < fresh else "does not hold"
    table.loc[table.hypothesis == "H4 drift from vanilla", "verdict"] += f" | consistency beats freshness: {verdict}"
    return table


def _record(config: StudyConfig, base: CachedPolicy) -> tuple[dict, dict, dict]:
    """The study's runs keyed by (method, episode): every method with nothing reused, the compared methods as
    configured, and the faithful dual cache."""
    study = "mechanism_equivalence"
    with_methods = lambda methods: StudyConfig(**{**asdict(config), "methods": methods})  # noqa: E731
    runs = by_episode(record_runs(study, with_methods(list(METHODS)), ALL_DYNAMIC, tag="all_dynamic", base=base))
    cached = by_episode(record_runs(study, with_methods(["vanilla", "dual_cache", "dual_cache_llm_kv", "llm_kqv_only",
                                                         "ttf_vla_cache", "vit_kv_only"]), base=base))
    faithful = by_episode(record_runs(study, with_methods(["dual_cache"]), {"faithful": True}, tag="faithful", base=base))
    return runs, cached, faithful


def _row(hypothesis: str, left: str, right: str, pairs: list[tuple[xr.Dataset, xr.Dataset]],
         expect_equal: bool | None, note: str = "", tolerance: float = EQUIVALENCE_TOLERANCE) -> dict:
    """One comparison over episodes: the max of the max-statistics, the mean of the others, and the verdict
    (equal: max |logit diff| within `tolerance` and no token differs)."""
    stats = [_compare(a, b) for a, b in pairs]
    row = {"hypothesis": hypothesis, "compared": f"{left} vs {right}",
           **{k: max(s[k] for s in stats) if k.startswith("max") else float(np.mean([s[k] for s in stats]))
              for k in stats[0]}}
    row["tolerance"] = tolerance
    equal = row["max |logit diff|"] <= tolerance and row["token mismatch rate"] == 0
    if expect_equal is None:
        row["verdict"] = note
    else:
        row["verdict"] = ("holds" if equal == expect_equal else "FAILS") + (f": {note}" if note else "")
    return row
