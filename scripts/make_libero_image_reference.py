"""Make the upstream (TensorFlow) reference for the LIBERO image pipeline test.

Two steps, two interpreters, because the project must not depend on TensorFlow at run time:

  1. render a real frame with the project venv (LIBERO, CPU EGL):
       MUJOCO_GL=egl .venv/bin/python scripts/make_libero_image_reference.py render
     -> tests/fixtures/libero/agentview_256.png   (raw 256x256 agent-view render, not rotated)

  2. run the upstream OpenVLA pipeline on it in a throwaway TensorFlow venv:
       python3.11 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu pillow numpy
       /tmp/tfvenv/bin/python scripts/make_libero_image_reference.py tf
     -> tests/fixtures/libero/upstream_224.png       (rotate, JPEG q95 round trip, lanczos3 resize)
        tests/fixtures/libero/upstream_224_crop.png  (plus the policy-time 90% center crop)
        tests/fixtures/libero/reference.json         (versions and provenance)

The TF code below is copied from openvla/experiments/robot (libero_utils.get_libero_image,
robot_utils.resize_image, openvla_utils.crop_and_resize / get_vla_action) with only I/O around it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "libero"
SUITE, TASK, INIT = "libero_spatial", 0, 0


def render() -> None:
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")
    from dcvla.libero import protocol
    from dcvla.libero.env import close_env, get_init_state, make_env, reset_to_init_state

    env = make_env(SUITE, TASK, resolution=protocol.RENDER_RESOLUTION)
    try:
        obs = reset_to_init_state(env, get_init_state(SUITE, TASK, INIT))
        for _ in range(protocol.WAIT_STEPS):
            obs, _, _, _ = env.step(list(protocol.DUMMY_ACTION))
        frame = obs["agentview_image"]
    finally:
        close_env(env)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(FIXTURES / "agentview_256.png", optimize=True)
    print("wrote", FIXTURES / "agentview_256.png", frame.shape)


def upstream_tf() -> None:
    import tensorflow as tf

    def resize_image(img, resize_size):  # robot_utils.resize_image
        assert isinstance(resize_size, tuple)
        img = tf.image.encode_jpeg(img)  # Encode as JPEG, as done in RLDS dataset builder
        img = tf.io.decode_image(img, expand_animations=False, dtype=tf.uint8)  # Immediately decode back
        img = tf.image.resize(img, resize_size, method="lanczos3", antialias=True)
        img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
        return img.numpy()

    def get_libero_image(obs, resize_size):  # libero_utils.get_libero_image
        img = obs["agentview_image"]
        img = img[::-1, ::-1]  # IMPORTANT: rotate 180 degrees to match train preprocessing
        return resize_image(img, (resize_size, resize_size))

    def crop_and_resize(image, crop_scale, batch_size):  # openvla_utils.crop_and_resize
        assert image.shape.ndims == 3 or image.shape.ndims == 4
        expanded_dims = False
        if image.shape.ndims == 3:
            image = tf.expand_dims(image, axis=0)
            expanded_dims = True
        new_heights = tf.reshape(tf.clip_by_value(tf.sqrt(crop_scale), 0, 1), shape=(batch_size,))
        new_widths = tf.reshape(tf.clip_by_value(tf.sqrt(crop_scale), 0, 1), shape=(batch_size,))
        height_offsets = (1 - new_heights) / 2
        width_offsets = (1 - new_widths) / 2
        bounding_boxes = tf.stack(
            [height_offsets, width_offsets, height_offsets + new_heights, width_offsets + new_widths], axis=1)
        image = tf.image.crop_and_resize(image, bounding_boxes, tf.range(batch_size), (224, 224))
        if expanded_dims:
            image = image[0]
        return image

    def center_crop(img):  # the center_crop branch of openvla_utils.get_vla_action
        image = Image.fromarray(img).convert("RGB")
        image = tf.convert_to_tensor(np.array(image))
        orig_dtype = image.dtype
        image = tf.image.convert_image_dtype(image, tf.float32)
        image = crop_and_resize(image, 0.9, 1)
        image = tf.clip_by_value(image, 0, 1)
        image = tf.image.convert_image_dtype(image, orig_dtype, saturate=True)
        return np.array(Image.fromarray(image.numpy()).convert("RGB"))

    raw = np.asarray(Image.open(FIXTURES / "agentview_256.png").convert("RGB"))
    out = get_libero_image({"agentview_image": raw}, 224)
    crop = center_crop(out)
    Image.fromarray(out).save(FIXTURES / "upstream_224.png", optimize=True)
    Image.fromarray(crop).save(FIXTURES / "upstream_224_crop.png", optimize=True)
    info = {"tensorflow": tf.__version__, "numpy": np.__version__, "suite": SUITE, "task": TASK, "init_state": INIT,
            "input": "agentview_256.png (raw render after the 10 wait steps, not rotated)",
            "outputs": {"upstream_224.png": "get_libero_image(obs, 224)", "upstream_224_crop.png": "center crop 0.9 of it"}}
    (FIXTURES / "reference.json").write_text(json.dumps(info, indent=2) + "\n")
    print("wrote", FIXTURES, info)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "render":
        render()
    elif cmd == "tf":
        upstream_tf()
    else:
        sys.exit(f"usage: {sys.argv[0]} render|tf  (got {cmd!r}); see the module docstring")
