"""The upstream OpenVLA LIBERO evaluation protocol, without TensorFlow.

Upstream (openvla/experiments/robot/libero/run_libero_eval.py and robot_utils/openvla_utils):
  frame = obs["agentview_image"][::-1, ::-1]                      # 256x256 render, rotated 180 degrees
  frame = tf.io.decode_image(tf.image.encode_jpeg(frame))         # JPEG round trip, quality 95
  frame = tf.image.resize(frame, (224, 224), "lanczos3", antialias=True); round, clip, uint8
  at policy time: tf.image.crop_and_resize to the central 90% area, bilinear, back to 224; uint8
The JPEG step encodes with PIL (libjpeg-turbo, quality 95, 4:2:0 chroma: the same coefficients as TF's
encoder) and decodes with `simplejpeg` using the fast integer IDCT, because `tf.io.decode_image` decodes
with JDCT_IFAST; that pair is bit-exact with TF. Without simplejpeg the decode falls back to PIL, whose
accurate IDCT differs from TF's by about 1 level on average (max ~15) on LIBERO frames. The two resizes
are re-implemented in float32 numpy with TF's exact sampling rules rather than with PIL's resize, whose
8-bit intermediate between the horizontal and vertical passes adds +-1 level errors. The match against a
TF-computed reference is tested in tests/test_libero_protocol.py.

For pi0 / pi0.5 policies (openpi's LIBERO example) the module also gives the 8-dim proprioceptive state
(`robot_state`, `obs_state`), action chunks (`action_chunk`) and the LIBERO-convention gripper handling
(`postprocess_libero_action`); see the section at the end.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
from PIL import Image

SEED = 7  # upstream cfg.seed: numpy, random and torch are seeded with it once per run
ENV_SEED = 0  # upstream get_libero_env: env.seed(0), "seed seems to affect object positions"
RENDER_RESOLUTION = 256
POLICY_RESOLUTION = 224
JPEG_QUALITY = 95
CENTER_CROP_SCALE = 0.9  # fraction of the image *area* kept by the center crop
WAIT_STEPS = 10
DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
NUM_TRIALS = 50
#: Policy steps after the wait, per suite (upstream: longest training demo of the suite, rounded up).
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
#: OpenVLA's reported success rates (%) for the LIBERO fine-tunes.
REPORTED_SUCCESS = {"libero_spatial": 84.7, "libero_object": 88.4, "libero_goal": 79.2, "libero_10": 53.7}


def max_steps(suite: str) -> int:
    """Policy-step budget for `suite`; raises a ValueError listing the valid suites."""
    if suite not in MAX_STEPS:
        raise ValueError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(MAX_STEPS)}")
    return MAX_STEPS[suite]


def rotate180(img: np.ndarray) -> np.ndarray:
    """LIBERO renders upside down relative to the training data: flip both axes (a copy, contiguous)."""
    return np.ascontiguousarray(img[::-1, ::-1])


def jpeg_encode(img: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB uint8 image (baseline, 4:2:0, like `tf.image.encode_jpeg` defaults)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8), "RGB").save(buf, format="JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


try:
    import simplejpeg as _simplejpeg
except ImportError:  # optional: see the module docstring for what is lost without it
    _simplejpeg = None

#: Which JPEG decoder is in use: "simplejpeg-ifast" (bit-exact with TF) or "pil-islow" (fallback).
JPEG_DECODER = "simplejpeg-ifast" if _simplejpeg is not None else "pil-islow"


def jpeg_decode(data: bytes) -> np.ndarray:
    """Decode JPEG bytes to an RGB uint8 array, with TF's fast integer IDCT when simplejpeg is installed."""
    if _simplejpeg is not None:
        return _simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _lanczos3(x: np.ndarray) -> np.ndarray:
    # TF's kernel: sinc(x) * sinc(x / 3) on |x| < 3, zero outside.
    out = np.sinc(x) * np.sinc(x / 3.0)
    return np.where(np.abs(x) < 3.0, out, 0.0)


@functools.lru_cache(maxsize=16)
def _lanczos_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of tf.image.resize(method="lanczos3", antialias=True) along one axis.

    Mirrors tensorflow/core/kernels/image/scale_and_translate_op.cc (ComputeSpansCore): half-pixel
    centres, kernel widened by 1/scale when downsampling, taps clamped to the image, weights normalised.
    """
    scale = n_out / n_in
    inv_scale = 1.0 / scale
    kernel_scale = max(inv_scale, 1.0)
    radius = 3.0 * kernel_scale
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        sample = (i + 0.5) * inv_scale
        start = max(int(np.ceil(sample - radius - 0.5)), 0)
        end = min(int(np.floor(sample + radius - 0.5)), n_in - 1)
        taps = np.arange(start, end + 1)
        weights = _lanczos3((taps + 0.5 - sample) / kernel_scale)
        total = weights.sum()
        if abs(total) > 0:
            weights = weights / total
        w[i, taps] = weights
    return w.astype(np.float32)


def resize_lanczos(img: np.ndarray, size: int = POLICY_RESOLUTION) -> np.ndarray:
    """`tf.image.resize(img, (size, size), "lanczos3", antialias=True)`, rounded and clipped to uint8."""
    h, w = img.shape[:2]
    wy, wx = _lanczos_matrix(h, size), _lanczos_matrix(w, size)
    x = np.asarray(img, dtype=np.float32)
    c = x.shape[2]
    out = (wy @ x.reshape(h, w * c)).reshape(size, w, c)  # rows; plain matmuls hit BLAS, einsum did not
    out = np.matmul(wx, out)  # columns, batched over output rows: [size, w] @ [size, w, c]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def process_frame(render: np.ndarray, size: int = POLICY_RESOLUTION) -> np.ndarray:
    """Raw 256x256 agent-view render -> the 224x224 uint8 frame upstream stores/feeds (no crop)."""
    return decode_frame(encode_frame(render), size)


def encode_frame(render: np.ndarray) -> bytes:
    """The first half of `process_frame`: rotate and JPEG-encode (what episode files store)."""
    return jpeg_encode(rotate180(render))


def decode_frame(data: bytes, size: int = POLICY_RESOLUTION) -> np.ndarray:
    """The second half of `process_frame`: JPEG-decode and lanczos-resize to `size`."""
    return resize_lanczos(jpeg_decode(data), size)


def _bilinear_axis(n_in: int, n_out: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # tf.image.crop_and_resize: in = lo*(n-1) + i*(hi-lo)*(n-1)/(n_out-1), interpolated between floor/ceil.
    pos = lo * (n_in - 1) + np.arange(n_out) * (hi - lo) * (n_in - 1) / (n_out - 1)
    top = np.floor(pos).astype(int)
    bottom = np.minimum(top + 1, n_in - 1)
    return top, bottom, (pos - top).astype(np.float32)


def center_crop(img: np.ndarray, scale: float = CENTER_CROP_SCALE, size: int | None = None) -> np.ndarray:
    """Upstream's policy-time crop: central `scale` of the area, bilinearly resized back, uint8.

    Upstream converts to float in [0, 1], calls `tf.image.crop_and_resize` with box side sqrt(scale),
    clips, and converts back with `tf.image.convert_image_dtype(..., uint8, saturate=True)`, which
    multiplies by 255.5 and truncates; that conversion is reproduced here exactly.
    """
    h, w = img.shape[:2]
    size = size or h
    side = float(np.clip(np.sqrt(np.float32(scale)), 0, 1))
    off = (1 - side) / 2
    x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    t, b, fy = _bilinear_axis(h, size, off, off + side)
    l, r, fx = _bilinear_axis(w, size, off, off + side)
    fx = fx[None, :, None]
    top = x[t][:, l] + (x[t][:, r] - x[t][:, l]) * fx
    bot = x[b][:, l] + (x[b][:, r] - x[b][:, l]) * fx
    out = top + (bot - top) * fy[:, None, None]
    return (np.clip(out, 0, 1) * np.float32(255.5)).astype(np.uint8)


def policy_input(frame: np.ndarray, crop: bool = True) -> np.ndarray:
    """What the policy sees for a stored 224 frame: center-cropped when `crop` (the LIBERO fine-tunes)."""
    return center_crop(frame) if crop else frame


def postprocess_action(action: np.ndarray) -> np.ndarray:
    """OpenVLA action -> LIBERO action: gripper [0,1] -> [-1,1], binarised, sign flipped.

    OpenVLA's training data has 0 = close, 1 = open after normalisation, LIBERO wants -1 = open,
    +1 = close, hence the inversion. A gripper value exactly at 0.5 maps to 0 (sign of 0), as upstream.

    Args:
        action: float array [7] from the policy (xyz delta, rpy delta, gripper in [0, 1]).

    Returns:
        float64 array [7] ready for `env.step`.
    """
    a = np.array(action, dtype=np.float64).reshape(-1)
    if a.shape != (7,):
        raise ValueError(f"expected a 7-dim action, got shape {np.shape(action)}")
    g = 2.0 * a[6] - 1.0
    a[6] = -np.sign(g)
    return a


def openvla_action(libero_action: np.ndarray) -> np.ndarray:
    """LIBERO actions [..., 7] (gripper -1 = open, +1 = close) -> OpenVLA's convention (gripper 1 = open, 0 = close):
    the targets an OpenVLA is trained on, which `postprocess_action` maps back at evaluation."""
    a = np.array(libero_action, dtype=np.float64)
    a[..., 6] = (1.0 - np.clip(a[..., 6], -1.0, 1.0)) / 2.0
    return a


# --- Proprioceptive state and action chunks (pi0 / pi0.5; the OpenVLA path does not use them) ---
#
# openpi's LIBERO example (examples/libero/main.py) feeds Pi0 an 8-dim state:
#   concat(obs["robot0_eef_pos"], _quat2axisangle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"])
# and executes the first `replan_steps` (5) actions of each returned chunk before querying it again.

STATE_DIM = 8
#: The observation keys `obs_state` reads (robosuite's proprio observables; quaternions are xyzw).
STATE_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
#: Action conventions a policy can declare with an `action_convention` attribute (absent means "openvla").
ACTION_CONVENTIONS = ("openvla", "libero")
#: openpi's LIBERO client: actions executed from each chunk before the policy is called again.
REPLAN_STEPS = 5


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """Quaternion(s) (x, y, z, w) -> axis-angle (unit axis times angle in radians), as robosuite does.

    Same arithmetic as `robosuite.utils.transform_utils.quat2axisangle` (which openpi's LIBERO example
    copies): w is clipped to [-1, 1], den = sqrt(1 - w^2), den == 0 (robosuite's `math.isclose(den, 0.0)`
    with default tolerances is an exact comparison) gives zeros, else xyz * 2 acos(w) / den. Unlike
    robosuite it does not clip the caller's array in place, computes in float64 whatever the input dtype,
    and accepts a batch.

    Args:
        quat: array [..., 4], xyzw. Not normalised here (neither is it upstream).

    Returns:
        float64 array [..., 3].
    """
    q = np.array(quat, dtype=np.float64)  # a copy: the clip below must not touch the caller's array
    if q.ndim == 0 or q.shape[-1] != 4:
        raise ValueError(f"expected quaternion(s) of shape [..., 4] (x, y, z, w), got shape {np.shape(quat)}")
    w = np.clip(q[..., 3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    zero = den == 0.0
    safe = np.where(zero, 1.0, den)[..., None]
    out = (q[..., :3] * 2.0 * np.arccos(w)[..., None]) / safe
    return np.where(zero[..., None], 0.0, out)


def robot_state(eef_pos: np.ndarray, eef_quat: np.ndarray, gripper_qpos: np.ndarray) -> np.ndarray:
    """The 8-dim proprioceptive state openpi's LIBERO example feeds Pi0.

    Layout: [0:3] end-effector position, [3:6] axis-angle of the end-effector quaternion, [6:8] the two
    gripper finger joint positions. Batched inputs (same leading dims) give a batch of states.

    Args:
        eef_pos: [..., 3] end-effector position (robot0_eef_pos).
        eef_quat: [..., 4] end-effector orientation, xyzw (robot0_eef_quat).
        gripper_qpos: [..., 2] gripper finger joints (robot0_gripper_qpos).

    Returns:
        float32 array [..., 8] (`STATE_DIM`).
    """
    parts = {"eef_pos": (eef_pos, 3), "eef_quat": (eef_quat, 4), "gripper_qpos": (gripper_qpos, 2)}
    arrays = {}
    for name, (value, dim) in parts.items():
        a = np.asarray(value, dtype=np.float64)
        if a.ndim == 0 or a.shape[-1] != dim:
            raise ValueError(f"{name} must have shape [..., {dim}], got shape {np.shape(value)}")
        arrays[name] = a
    lead = {name: a.shape[:-1] for name, a in arrays.items()}
    if len(set(lead.values())) != 1:
        raise ValueError(f"eef_pos, eef_quat and gripper_qpos need the same leading dims, got "
                         + ", ".join(f"{k} {v}" for k, v in lead.items()))
    state = np.concatenate([arrays["eef_pos"], quat2axisangle(arrays["eef_quat"]), arrays["gripper_qpos"]], axis=-1)
    return state.astype(np.float32)


def obs_state(obs: dict) -> np.ndarray:
    """`robot_state` of a LIBERO observation dict (the keys in `STATE_KEYS`).

    Returns:
        float32 array [8].

    Raises:
        ValueError: a key is missing or an entry has the wrong shape (the message names it).
    """
    missing = [k for k in STATE_KEYS if k not in obs]
    if missing:
        raise ValueError(f"observation lacks {', '.join(missing)}; it has: {', '.join(map(str, obs))}")
    pos, quat, grip = (np.asarray(obs[k]) for k in STATE_KEYS)
    for key, a, dim in zip(STATE_KEYS, (pos, quat, grip), (3, 4, 2)):
        if a.shape != (dim,):
            raise ValueError(f"obs[{key!r}] must have shape ({dim},), got {a.shape}")
    return robot_state(pos, quat, grip)


def action_chunk(raw: Any) -> np.ndarray:
    """A policy's output as a chunk of actions: [horizon, 7] stays, a single action (7 values) is a chunk of one.

    Args:
        raw: what `policy.step` returned: a 7-dim action, or a 2-D action chunk [horizon, 7].

    Returns:
        float64 array [horizon, 7], horizon >= 1.

    Raises:
        ValueError: anything else (the message gives the shape).
    """
    a = np.asarray(raw, dtype=np.float64)
    if a.ndim == 2 and a.shape[1] == 7 and a.shape[0] >= 1:
        return a
    if a.ndim <= 1 and a.size == 7:
        return a.reshape(1, 7)
    raise ValueError(f"expected a 7-dim action or an action chunk [horizon, 7], got shape {a.shape}")


def postprocess_libero_action(action: np.ndarray) -> np.ndarray:
    """LIBERO-convention action (gripper -1 = open, +1 = close) -> env action: gripper binarised, no flip.

    For policies trained on LIBERO's own action convention (openpi's Pi0 LIBERO fine-tunes). The gripper
    becomes sign(g), so 0 stays 0, like `postprocess_action`'s sign(0). openpi's client sends the raw value
    instead; robosuite's PandaGripper only uses np.sign of it, so the env behaves identically.

    Args:
        action: float array [7] (xyz delta, rpy delta, gripper in about [-1, 1]).

    Returns:
        float64 array [7] ready for `env.step`.
    """
    a = np.array(action, dtype=np.float64).reshape(-1)
    if a.shape != (7,):
        raise ValueError(f"expected a 7-dim action, got shape {np.shape(action)}")
    a[6] = np.sign(a[6])
    return a


def action_convention(policy: Any) -> str:
    """The policy's declared `action_convention` ("openvla" when it declares none); ValueError if unknown."""
    convention = getattr(policy, "action_convention", None) or "openvla"
    if convention not in ACTION_CONVENTIONS:
        raise ValueError(f"{type(policy).__name__}.action_convention is {convention!r}; valid: {', '.join(ACTION_CONVENTIONS)}")
    return convention


def postprocess(action: np.ndarray, convention: str = "openvla") -> np.ndarray:
    """Policy action -> env action: `postprocess_action` for "openvla", `postprocess_libero_action` for "libero"."""
    if convention == "openvla":
        return postprocess_action(action)
    if convention == "libero":
        return postprocess_libero_action(action)
    raise ValueError(f"unknown action convention {convention!r}; valid: {', '.join(ACTION_CONVENTIONS)}")
