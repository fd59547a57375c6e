# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart: a policy, a cache, a recording
#
# A few minutes at the `tiny` preset (random weights, CPU): one OpenVLA policy with a cross-frame cache, one shipped
# LIBERO episode, a recording of what the cache did on each frame, and the two questions every study asks: what was
# reused, and what it cost in drift. The other notebooks are the studies; `explorer` browses recordings.

# %% tags=["parameters"]
preset = "tiny"           # model preset (random weights); "small" for the studies' size, or a checkpoint below
checkpoint = ""           # an OpenVLA checkpoint directory instead of random weights
method = "dual_cache"     # vanilla, vla_cache, ttf, ttf_vla_cache, dual_cache, ...
frames = 6                # frames of the episode to stream

# %% [markdown]
# **The policy.** `CachedPolicy` is OpenVLA (DINOv2 + SigLIP towers, a Llama that decodes 7 action tokens) behind a
# streaming API: `reset()` per episode, `step(image, instruction)` per frame. The cache method decides what each
# frame may take from the previous frames' K/V instead of computing it.

# %%
import numpy as np
import plotly.express as px

from dcvla.libero.episodes import list_episodes, load_episode
from dcvla.libero.protocol import policy_input
from dcvla.openvla import CacheConfig, CachedPolicy
from dcvla.recording import recorder_for

episode = load_episode(list_episodes(suite="libero_spatial")[0])
config = CacheConfig(method)
policy = (CachedPolicy.from_pretrained(checkpoint, config=config) if checkpoint
          else CachedPolicy.from_preset(preset, seed=0, config=config))
policy.reset()
action = policy.step(policy_input(episode.frames[0]), episode.instruction)
print(f"{episode.name}: {episode.instruction!r}\nfirst action (xyz, rpy, gripper): {np.round(action, 3)}")

# %% [markdown]
# **A recording.** `recorder_for(policy, drift=True)` records every frame into an xarray dataset: which image patches
# were reused, per tower and layer, the actions, FLOPs and latency; `drift=True` adds a full recompute of each frame
# beside it, so the drift of what was reused can be measured (it doubles the cost).

# %%
policy.reset()
with recorder_for(policy, drift=True) as recorder:
    for frame in episode.frames[:frames]:
        policy.step(policy_input(frame), episode.instruction)
ds = recorder.to_dataset()
print(f"{ds.sizes['frame']} frames, {ds.sizes['patch']} patches; reuse rate {float(ds.reuse.mean()):.0%}")

# %% [markdown]
# **The mask over the image.** Each patch of the last frame that the cache reused (white) or computed afresh: the
# static background is reused, what moves (the arm) is recomputed.

# %%
side = int(ds.sizes["patch"] ** 0.5)
last = ds.frame.values[-1]
mask = ds.reuse.sel(frame=last).values.reshape(side, side).astype(float)
image = policy_input(episode.frames[int(last)])
overlay = (0.55 * image + 0.45 * 255 * np.kron(mask, np.ones((image.shape[0] // side, image.shape[1] // side)))[..., None]).astype(np.uint8)
px.imshow(overlay, title=f"{method}: reused patches of frame {int(last)} (light)")

# %% [markdown]
# **Drift over frames.** The KL of the method's action-token distributions to the full recompute's, per frame: 0
# where the frame reused nothing (a keyframe), small but not 0 where it reused stale K/V.

# %%
px.line(x=ds.frame.values, y=ds.logit_kl.values, markers=True, labels={"x": "frame", "y": "action KL to recompute"},
        title=f"{method}: what reuse cost, frame by frame")

# %% [markdown]
# **Where next.** `dcvla run cache_behaviour -p preset tiny` measures this for every method on every shipped
# episode; `mechanism_equivalence`, `long_horizon_stability`, `libero_benchmark` and `stability_cliff` (pi0, pi0.5,
# SmolVLA) are the other studies; `explorer` opens the recordings they leave under `data/runs/`.
