"""The mechanism equivalence study: hypotheses H0-H4 of the design, tested on recorded runs."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..devices import parse_dtype
from ..openvla import METHODS
from ..openvla.cache_policy import CachePolicyBase
from ..openvla.vla_cache import UPSTREAM_CONSTANTS
from ..units import Unit
from .common import (StudyConfig, action_divergence, base_policy, by_episode, divergence_name, plan_of,
                     record_runs, record_units)

ALL_DYNAMIC = {"keyframe_interval": 1, "top_k_static": 0}  # nothing reused by either selector
EQUIVALENCE_TOLERANCE = 1e-4  # max |difference| of the judged output that counts as "equal" in float32
ROUNDING_MARGIN = 4           # reassociated sums over a changed GEMM shape round a few ulps apart
#: What equality is judged on, per family: (variable, in words, its magnitude). OpenVLA: the logits of its 256
#: action tokens (a trained OpenVLA's and the random presets': 4-20); OpenVLA-OFT: the L1 head's normalised chunk,
#: in [-1, 1].
JUDGED_OUTPUT = {"openvla": ("action_logits", "action-token logits", 20.0),
                 "openvla-oft": ("action_normalized", "normalised action chunk (L1 head)", 1.0)}

STUDY = "mechanism_equivalence"


def equivalence_tolerance(dtype: str, family: str = "openvla") -> float:
    """Max |difference| of the family's judged output (`JUDGED_OUTPUT`) that counts as "equal" for a model run in
    `dtype`: 1e-4 in float32; in a 16-bit dtype a few ulps of the output's magnitude (OpenVLA's logits: bfloat16
    0.625, float16 0.078; OpenVLA-OFT's chunk: bfloat16 0.031). Dropping or adding rows changes GEMM shapes, and on
    a GPU that changes the rounding, so an fp32 tolerance would call equal computations unequal."""
    if dtype == "float32":
        return EQUIVALENCE_TOLERANCE
    return ROUNDING_MARGIN * torch.finfo(parse_dtype(dtype)).eps * JUDGED_OUTPUT[family][2]


def judged_output(ds: xr.Dataset) -> str:
    """What equality is judged on for the run's family, in words (`JUDGED_OUTPUT`)."""
    return JUDGED_OUTPUT[ds.attrs.get("family", "openvla")][1]


def _compare(a: xr.Dataset, b: xr.Dataset) -> dict[str, float]:
    output = JUDGED_OUTPUT[a.attrs.get("family", "openvla")][0]
    tokens = "action_tokens" in a  # OpenVLA decodes tokens; OpenVLA-OFT regresses its chunk
    return {
        "max |output diff|": float(np.abs(a[output].astype(np.float32) - b[output].astype(np.float32)).max()),
        "token mismatch rate": float((a.action_tokens != b.action_tokens).mean()) if tokens else float("nan"),
        "max |action diff|": float(np.abs(a.action - b.action).max()),
        f"mean {divergence_name(a)}": float(action_divergence(a, b).mean()),
    }


def equivalence_tests(config: StudyConfig, base: CachePolicyBase | None = None) -> pd.DataFrame:
    """H0-H4 of the design, measured on the configured shipped episodes (OpenVLA or OpenVLA-OFT).

    Returns:
        One row per comparison: hypothesis, the two runs, what equality is judged on (`output`: OpenVLA's
        action-token logits, OpenVLA-OFT's normalised chunk), its max |difference|, the token mismatch rate (NaN
        without tokens), max |action diff|, the mean action divergence (OpenVLA: "mean action KL", OpenVLA-OFT:
        "mean action L1"), the tolerance and a verdict computed from the numbers.
    """
    base = base or base_policy(config)
    runs, cached, faithful = _record(config, base)
    episodes_ = sorted({ep for _, ep in cached})

    def pairs(left: dict, a: str, right: dict, b: str) -> list[tuple[xr.Dataset, xr.Dataset]]:
        return [(left[(a, ep)], right[(b, ep)]) for ep in episodes_]

    tol = equivalence_tolerance(config.dtype, base.family)
    top_k, removed = UPSTREAM_CONSTANTS[base.family]
    per_image = " per image" if len(base.image_names) > 1 else ""
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
             f"and layer schedule ({top_k} static, {removed} most attended removed{per_image}) in the LLM", tol),
    ]
    rows += [_row("H4 drift from vanilla", method, "vanilla", pairs(cached, method, cached, "vanilla"), None,
                  "consistent reuse (vision + conditioned LLM rows)" if method == "dual_cache" else "stale vision, fresh LLM", tol)
             for method in ("dual_cache", "vit_kv_only")]
    table = pd.DataFrame(rows)
    divergence = next(column for column in table if column.startswith("mean action "))
    h4 = table[table.hypothesis == "H4 drift from vanilla"].set_index("compared")[divergence]
    consistent, fresh = h4["dual_cache vs vanilla"], h4["vit_kv_only vs vanilla"]
    verdict = "holds" if consistent < fresh else "does not hold"
    table.loc[table.hypothesis == "H4 drift from vanilla", "verdict"] += f" | consistency beats freshness: {verdict}"
    return table


def _recordings(config: StudyConfig) -> list[tuple[StudyConfig, dict | None, str]]:
    """What the study records, as (config, CacheConfig overrides, tag): every method with nothing reused, the
    compared methods as configured, and the faithful dual cache."""
    with_methods = lambda methods: StudyConfig(**{**asdict(config), "methods": methods})  # noqa: E731
    return [(with_methods(list(METHODS)), ALL_DYNAMIC, "all_dynamic"),
            (with_methods(["vanilla", "dual_cache", "dual_cache_llm_kv", "llm_kqv_only", "ttf_vla_cache", "vit_kv_only"]),
             None, ""),
            (with_methods(["dual_cache"]), {"faithful": True}, "faithful")]


def plan(parameters: dict) -> tuple[list[Unit], tuple[str, dict]]:
    """Every unit the notebook records with these parameters, and their worker (`dcvla run --shard/--ray`)."""
    config = StudyConfig.from_parameters(parameters)
    return plan_of([u for c, o, t in _recordings(config) for u in record_units(STUDY, c, o, t)], config)


def _record(config: StudyConfig, base: CachePolicyBase) -> tuple[dict, dict, dict]:
    """The study's runs keyed by (method, episode), in `_recordings`' order."""
    runs, cached, faithful = (by_episode(record_runs(STUDY, c, o, tag=t, base=base)) for c, o, t in _recordings(config))
    return runs, cached, faithful


def _row(hypothesis: str, left: str, right: str, pairs: list[tuple[xr.Dataset, xr.Dataset]],
         expect_equal: bool | None, note: str = "", tolerance: float = EQUIVALENCE_TOLERANCE) -> dict:
    """One comparison over episodes: the max of the max-statistics, the mean of the others, and the verdict
    (equal: max |output diff| within `tolerance` and no token differs)."""
    stats = [_compare(a, b) for a, b in pairs]
    row = {"hypothesis": hypothesis, "compared": f"{left} vs {right}", "output": judged_output(pairs[0][0]),
           **{k: max(s[k] for s in stats) if k.startswith("max") else float(np.mean([s[k] for s in stats]))
              for k in stats[0]}}
    row["tolerance"] = tolerance
    equal = row["max |output diff|"] <= tolerance and not row["token mismatch rate"] > 0  # NaN: no tokens
    if expect_equal is None:
        row["verdict"] = note
    else:
        row["verdict"] = ("holds" if equal == expect_equal else "FAILS") + (f": {note}" if note else "")
    return row
