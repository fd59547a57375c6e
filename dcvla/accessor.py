"""`ds.dcvla`: the selections and summaries of recorded datasets that the studies use."""

from __future__ import annotations

import numpy as np
import xarray as xr


@xr.register_dataset_accessor("dcvla")
class DcvlaAccessor:
    """Summaries of a dataset made by `dcvla.openvla.record.OpenVLARecorder` (one method, one episode)."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def _need(self, *names: str) -> None:
        missing = [n for n in names if n not in self._ds]
        if missing:
            raise KeyError(f"this dataset has no {', '.join(missing)}; record it (Recorder what=/drift=)")

    def layer_mask(self) -> xr.DataArray:
        """(tower, layer) True where the layer exists in that component (the layer dim is padded)."""
        depths = self._ds.attrs["tower_depths"]
        depth = xr.DataArray(np.asarray(depths), coords={"tower": self._ds.tower}, dims="tower")
        return self._ds.layer < depth

    def reuse_rate(self, dim: str | list[str] = "patch") -> xr.DataArray:
        """Share of patches reused (the selector's mask), averaged over `dim` (default: per frame)."""
        self._need("reuse")
        return self._ds.reuse.astype(float).mean(dim)

    def reuse_rate_by_layer(self) -> xr.DataArray:
        """(tower, layer): share of patches whose K/V came from the cache, over frames; NaN past a tower's depth."""
        self._need("reuse_by_layer")
        rate = self._ds.reuse_by_layer.astype(float).mean(("frame", "patch"))
        return rate.where(self.layer_mask())

    def llm_reuse_rate(self) -> float:
        """Share of vision tokens whose LLM K/V came from the cache, over frames, the LLM's layers and patches."""
        self._need("reuse_by_layer")
        llm = self._ds.reuse_by_layer.sel(tower="llm").astype(float)
        return float(llm.where(self.layer_mask().sel(tower="llm")).mean())

    def non_keyframes(self) -> xr.Dataset:
        self._need("keyframe")
        return self._ds.sel(frame=~self._ds.keyframe)

    def drift_vs_staleness(self, variable: str = "k_drift", tower: str = "llm", metric: str = "cosine") -> xr.DataArray:
        """Mean drift (over layers and patches) as a function of a patch's staleness, for one component."""
        self._need(variable, "staleness")
        drift = self._ds[variable].sel(tower=tower, metric=metric).where(self.layer_mask().sel(tower=tower))
        per_patch = drift.astype(float).mean("layer")  # [frame, patch]
        return per_patch.groupby(self._ds.staleness.rename("staleness")).mean(...)

    def action_drift(self) -> xr.DataArray:
        """Per frame: L2 distance between the action taken and the full recompute's (`action_ref`)."""
        self._need("action", "action_ref")
        return np.sqrt(((self._ds.action - self._ds.action_ref) ** 2).sum("action_dim"))

    def flops_ratio(self, reference: xr.Dataset) -> float:
        """Total FLOPs of `reference` (e.g. the vanilla run on the same frames) over this run's."""
        self._need("flops")
        return float(reference.flops.sum() / self._ds.flops.sum())
