"""scripts/gif_strip.py: rollout GIFs as rows of one PNG, the same frames of each."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from test_training import load_script

script = load_script("gif_strip")


def _gif(path, shades: list[int], size: int = 8) -> None:
    frames = [Image.new("RGB", (size, size), (s, s, s)) for s in shades]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)


def test_rows_hold_the_same_frames_and_a_short_trial_leaves_blanks(tmp_path):
    _gif(tmp_path / "a.gif", [0, 40, 80, 120, 160])
    _gif(tmp_path / "b.gif", [200, 60])
    out = tmp_path / "strip.png"
    assert script.main([str(tmp_path / "a.gif"), str(tmp_path / "b.gif"), "--first", "1", "--every", "2",
                        "--out", str(out)]) == 0
    px = np.asarray(Image.open(out))
    assert px.shape == (16, 16, 3)  # frames 1 and 3, two rows
    cell = lambda r, c: px[r * 8 + 4, c * 8 + 4, 0]  # noqa: E731
    assert (cell(0, 0), cell(0, 1), cell(1, 0)) == (40, 120, 60)
    assert cell(1, 1) == 255  # b has no frame 3
    assert not list(tmp_path.glob("*.tmp"))


def test_a_missing_file_or_differing_sizes_are_named(tmp_path, capsys):
    _gif(tmp_path / "a.gif", [0, 40])
    _gif(tmp_path / "big.gif", [0, 40], size=16)
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "nope.gif"), "--out", str(tmp_path / "x.png")])
    assert "nope.gif" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "a.gif"), str(tmp_path / "big.gif"), "--out", str(tmp_path / "x.png")])
    assert "big.gif (16, 16)" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
