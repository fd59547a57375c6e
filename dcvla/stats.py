"""Dataset statistics: which entry of a checkpoint's statistics un-normalises its actions (every family)."""

from __future__ import annotations

from typing import Mapping


def resolve_unnorm_key(norm_stats: Mapping[str, dict], unnorm_key: str | None) -> str:
    """Pick the dataset statistics to un-normalise with.

    `None` is allowed only when the checkpoint has statistics for exactly one dataset. A key that is
    missing falls back to `{key}_no_noops` (the LIBERO fine-tunes' names), as upstream's LIBERO eval does.

    Raises:
        KeyError: naming the key and listing the available ones.
    """
    available = sorted(norm_stats)
    if not available:
        raise KeyError("this model has no dataset statistics (dataset_statistics.json); cannot un-normalise actions")
    if unnorm_key is None:
        if len(available) != 1:
            raise KeyError(f"the model has statistics for several datasets; pass unnorm_key, one of: {', '.join(available)}")
        return available[0]
    if unnorm_key in norm_stats:
        return unnorm_key
    if f"{unnorm_key}_no_noops" in norm_stats:
        return f"{unnorm_key}_no_noops"
    raise KeyError(f"unnorm_key {unnorm_key!r} not found; available: {', '.join(available)}")
