"""The unified (TTF) token selector: keyframes, the pixel and attention tests and their fusion, the text-to-vision
relevance, on hand-made frames whose expected answers are worked out by hand in the comments."""

import math

import numpy as np
import pytest
import torch

from dcvla.openvla.config import get_preset
from dcvla.openvla.processing import preprocess_image
from dcvla.openvla.ttf_selector import SelectorConfig, UnifiedTokenSelector, text_to_vision_relevance, top_k_patches
from dcvla.vision import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD

GEN = torch.Generator().manual_seed(0)
BASE = torch.rand(3, 224, 224, generator=GEN)  # [0, 1] RGB
DINO_GAIN = sum(w / s for w, s in zip((0.299, 0.587, 0.114), IMAGENET_STD))  # 4.43288: grey step -> DINOv2 |dY|


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are small; on a shared 2-core machine intra-op threads only add contention (~100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def normalise(rgb: torch.Tensor) -> torch.Tensor:
    """[3, 224, 224] in [0, 1] -> [1, 6, 224, 224] as OpenVLA's processor stacks the two towers."""
    towers = [(rgb - torch.tensor(m).view(3, 1, 1)) / torch.tensor(s).view(3, 1, 1)
              for m, s in ((IMAGENET_MEAN, IMAGENET_STD), (SIGLIP_MEAN, SIGLIP_STD))]
    return torch.cat(towers)[None]


def patch_slice(j: int):
    r, c = divmod(j, 16)
    return slice(r * 14, (r + 1) * 14), slice(c * 14, (c + 1) * 14)


def changed(j: int, delta, channels=(0, 1, 2)) -> torch.Tensor:
    rgb = BASE.clone()
    ys, xs = patch_slice(j)
    for ch in channels:
        rgb[ch, ys, xs] += delta
    return rgb


def second_frame(selector: UnifiedTokenSelector, first: torch.Tensor, second: torch.Tensor, relevance=None):
    selector.select(first, None)
    return selector.select(second, torch.zeros(256) if relevance is None else relevance)


def pixel_only(**kw) -> UnifiedTokenSelector:
    return UnifiedTokenSelector(SelectorConfig(fusion="pixel", **kw))


# --- keyframes -------------------------------------------------------------------------------------------------


def test_keyframes_at_0_k_2k_and_after_reset():
    selector = UnifiedTokenSelector()  # interval 3, hybrid, top-70
    relevance = torch.arange(256.0)  # top-70 = patches 186..255
    frame = normalise(BASE)
    keys = [selector.select(frame, relevance).keyframe for _ in range(8)]
    assert keys == [True, False, False, True, False, False, True, False]
    sel = selector.select(frame, relevance)  # frame 8: still frame-count based, not reset by keyframe 6
    assert not sel.keyframe and sel.reuse.nonzero().flatten().tolist() == list(range(186))
    selector.reset()
    sel = selector.select(frame, relevance)
    assert sel.keyframe and not sel.reuse.any() and sel.pixel_dynamic.all() and sel.attn_relevant.all()
    assert [selector.select(frame, relevance).keyframe for _ in range(3)] == [False, False, True]


def test_pixel_test_compares_consecutive_frames_across_keyframes():
    selector = pixel_only()
    a, b, c = normalise(BASE), normalise(changed(20, 0.1)), normalise(changed(30, 0.1))
    dynamic = [selector.select(f, None).pixel_dynamic.nonzero().flatten().tolist() for f in (a, b, b, c, c, a)]
    # frame 3 is a keyframe (everything recomputed) but still becomes the reference of frame 4.
    assert dynamic == [list(range(256)), [20], [], list(range(256)), [], [30]]


def test_interval_one_reuses_nothing():
    selector = UnifiedTokenSelector(SelectorConfig(keyframe_interval=1))
    assert all(selector.select(normalise(BASE), torch.zeros(256)).keyframe for _ in range(4))


# --- pixel test ------------------------------------------------------------------------------------------------


def test_one_changed_patch_is_the_only_dynamic_one():
    sel = second_frame(pixel_only(), normalise(BASE), normalise(changed(87, 0.1)))  # patch row 5, column 7
    assert sel.pixel_dynamic.nonzero().flatten().tolist() == [87]
    assert sel.reuse.sum() == 255 and not sel.reuse[87]
    assert sel.pixel_score[87].item() == pytest.approx(0.1 * DINO_GAIN, rel=1e-5)  # DINOv2 outweighs SigLIP's 0.2
    assert (sel.pixel_score[torch.arange(256) != 87] == 0).all()


@pytest.mark.parametrize("y, x, patch", [(13, 13, 0), (14, 14, 17), (223, 0, 240)])
def test_patch_grid_is_row_major(y, x, patch):
    rgb = BASE.clone()
    rgb[:, y, x] += 1.0  # one pixel: 4.43 / 196 = 0.0226 < 0.03, so lower the threshold
    sel = second_frame(pixel_only(pixel_threshold=0.01), normalise(BASE), normalise(rgb))
    assert sel.pixel_dynamic.nonzero().flatten().tolist() == [patch]


@pytest.mark.parametrize("channel", [1, 4])  # DINOv2 green, SigLIP green: either tower's change counts
def test_threshold_flips_on_normalised_scale(channel):
    for factor, expected in ((0.99, False), (1.01, True)):
        second = normalise(BASE)
        ys, xs = patch_slice(40)
        second[0, channel, ys, xs] += 0.03 / 0.587 * factor  # |dY| = 0.587 * delta, TTF weights on normalised values
        assert second_frame(pixel_only(), normalise(BASE), second).pixel_dynamic[40].item() is expected


def test_threshold_flips_on_unit_scale():
    for factor, expected in ((0.99, False), (1.01, True)):
        sel = second_frame(pixel_only(pixel_space="unit"), normalise(BASE), normalise(changed(40, 0.03 * factor)))
        assert sel.pixel_dynamic[40].item() is expected
        assert sel.pixel_score[40].item() == pytest.approx(0.03 * factor, rel=1e-4)


def test_ttf_threshold_is_about_1_7_grey_levels_through_the_processor():
    rng = np.random.default_rng(0)
    image = rng.integers(20, 230, (224, 224, 3), dtype=np.uint8)
    tiny = get_preset("tiny")
    for levels, expected in ((1, False), (2, True)):  # 0.03 / 4.43288 * 255 = 1.73 grey levels
        brighter = image.copy()
        brighter[:14, :14] += levels
        sel = second_frame(pixel_only(), preprocess_image(image, tiny), preprocess_image(brighter, tiny))
        assert sel.pixel_dynamic.nonzero().flatten().tolist() == ([0] if expected else [])
        assert sel.pixel_score[0].item() == pytest.approx(levels / 255 * DINO_GAIN, rel=1e-4)


def test_blue_counts_less_than_green():
    for space, threshold in (("ttf", 0.03), ("unit", 0.005)):
        blue = second_frame(pixel_only(pixel_space=space, pixel_threshold=threshold), normalise(BASE),
                            normalise(changed(3, 0.02, channels=(2,))))
        green = second_frame(pixel_only(pixel_space=space, pixel_threshold=threshold), normalise(BASE),
                             normalise(changed(3, 0.02, channels=(1,))))
        assert green.pixel_dynamic[3] and not blue.pixel_dynamic[3]  # ttf: 0.0524 vs 0.0101; unit: 0.0117 vs 0.0023
        assert blue.pixel_score[3] < green.pixel_score[3] / 4


# --- attention test and fusion ---------------------------------------------------------------------------------


def test_attention_top_k_is_exact_and_ties_go_to_the_lower_index():
    relevance = torch.zeros(256)
    relevance[[10, 200, 3, 100]] = torch.tensor([5.0, 4.0, 3.0, 3.0])
    assert top_k_patches(relevance, 3).nonzero().flatten().tolist() == [3, 10, 200]
    assert top_k_patches(relevance, 0).sum() == 0 and top_k_patches(relevance, 256).all()
    assert top_k_patches(torch.zeros(256), 5).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    selector = UnifiedTokenSelector(SelectorConfig(fusion="attention", attention_top_k=3))
    sel = second_frame(selector, normalise(BASE), normalise(changed(50, 0.5)), relevance)
    assert sel.attn_relevant.nonzero().flatten().tolist() == [3, 10, 200]
    assert not sel.pixel_dynamic.any() and sel.pixel_score[50] > 1  # measured, but not used by "attention"
    assert torch.equal(sel.reuse, ~sel.attn_relevant)


@pytest.mark.parametrize("fusion, recomputed", [("hybrid", [1, 2, 50]), ("pixel", [1, 2]), ("attention", [2, 50])])
def test_fusion_modes(fusion, recomputed):
    second = changed(1, 0.2)
    second[:, :14, 28:42] += 0.2  # patch 2
    relevance = torch.zeros(256)
    relevance[[2, 50]] = 1.0
    selector = UnifiedTokenSelector(SelectorConfig(fusion=fusion, attention_top_k=2))
    sel = second_frame(selector, normalise(BASE), normalise(second), relevance)
    assert (~sel.reuse).nonzero().flatten().tolist() == recomputed
    assert torch.equal(sel.reuse, ~(sel.pixel_dynamic | sel.attn_relevant))


def test_missing_relevance_on_a_non_keyframe():
    for fusion, reused in (("hybrid", 0), ("attention", 0), ("pixel", 255)):
        selector = UnifiedTokenSelector(SelectorConfig(fusion=fusion))
        selector.select(normalise(BASE), None)
        assert selector.select(normalise(changed(9, 0.2)), None).reuse.sum() == reused


def test_text_to_vision_relevance_rows_heads_and_cap():
    q, k = 257 + 40, 297
    attn = torch.zeros(1, 2, q, k)
    rows = torch.arange(q, dtype=torch.float32).view(q, 1)
    attn[0, 0, :, 1:257] = rows
    attn[0, 1, :, 1:257] = rows + 2  # head mean = row + 1
    # Text rows 257..291 (35 of the 40): mean row 274, so every patch gets 275.
    assert torch.allclose(text_to_vision_relevance(attn), torch.full((256,), 275.0))
    kept = torch.cat([torch.arange(0, 100), torch.arange(257, q)])  # a pruned prefill: some vision rows missing
    pruned = attn[:, :, kept]
    pruned[0, :, :100] = 1e6  # rows at vision positions must be ignored
    assert torch.allclose(text_to_vision_relevance(pruned, kept), torch.full((256,), 275.0))
    with pytest.raises(ValueError, match="no query row at a text position"):
        text_to_vision_relevance(attn[:, :, :200])


# --- validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pixels, relevance, error, message",
    [
        (torch.zeros(1, 3, 224, 224), None, ValueError, r"shape \[1, 6, 224, 224\].*got \[1, 3, 224, 224\]"),
        (torch.zeros(6, 224, 224), None, ValueError, r"got \[6, 224, 224\]"),
        (torch.zeros(1, 6, 112, 112), None, ValueError, r"got \[1, 6, 112, 112\]"),
        (torch.full((1, 6, 224, 224), math.nan), None, ValueError, "301056 NaN or infinite"),
        (torch.zeros(1, 6, 224, 224, dtype=torch.uint8), None, TypeError, "normalised floats"),
        (np.zeros((1, 6, 224, 224)), None, TypeError, "must be a torch.Tensor"),
        (torch.zeros(1, 6, 224, 224), torch.zeros(255), ValueError, r"text_to_vision must have shape \[256\].*\[255\]"),
        (torch.zeros(1, 6, 224, 224), torch.full((256,), math.nan), ValueError, "text_to_vision has 256 NaN"),
        (torch.zeros(1, 6, 224, 224), [0.0] * 256, TypeError, "text_to_vision must be a torch.Tensor"),
    ],
)
def test_bad_inputs_are_named_and_leave_state_alone(pixels, relevance, error, message):
    selector = UnifiedTokenSelector()
    with pytest.raises(error, match=message):
        selector.select(pixels, relevance)
    assert selector.select(normalise(BASE), None).keyframe  # the failed call did not count as a frame


@pytest.mark.parametrize(
    "field, value",
    [
        ("pixel_threshold", -0.1), ("pixel_threshold", math.inf), ("pixel_threshold", math.nan),
        ("attention_top_k", 257), ("attention_top_k", -1), ("attention_top_k", 7.0), ("attention_layer_id", -1),
        ("keyframe_interval", 0), ("keyframe_interval", True), ("pixel_space", "rgb"),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SelectorConfig\.{field}"):
        SelectorConfig(**{field: value})


def test_unknown_fusion_lists_the_valid_ones():
    with pytest.raises(ValueError, match="SelectorConfig.fusion must be one of hybrid, pixel, attention; got 'both'"):
        SelectorConfig(fusion="both")
