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
"""

from __future__ import annotations

import functools
import io

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
