"""Scene ground truth mapped onto stored clip frames lands on the drawn objects."""
import json

import numpy as np
import pytest

from jobs.cli import main
from pipelines.decode import DecodeConfig, decode_file
from pipelines.groundtruth import clip_targets, source_to_output_boxes


def test_box_mapping_crop_and_letterbox_exact():
    box = np.array([[10.0, 20.0, 110.0, 60.0]])
    # 200x100 source, crop to 50: scale 0.5 -> 100x50, centre crop x0 = 25
    np.testing.assert_allclose(source_to_output_boxes(box, 200, 100, DecodeConfig(size=50)), [[0, 10, 30, 30]])
    # letterbox to 50: scale 0.25 -> 50x25, padded y0 = 12
    np.testing.assert_allclose(source_to_output_boxes(box, 200, 100, DecodeConfig(size=50, resize="letterbox")),
                               [[2.5, 17, 27.5, 27]])


@pytest.mark.parametrize("resize", ["crop", "letterbox"])
def test_targets_cover_the_drawn_objects(tmp_path, resize):
    assert main(["synth", "--out", str(tmp_path), "--videos", "1", "--seed", "5", "--seconds", "2",
                 "--size", "96", "--fps", "10"]) == 0
    gt = json.loads((tmp_path / "scene_00000.json").read_text())
    cfg = DecodeConfig(clip_seconds=1.0, fps=5, size=48, resize=resize)
    _, clips = decode_file(str(tmp_path / "scene_00000.mp4"), cfg)
    background = np.median(clips[0].frames.reshape(-1, 3), axis=0)
    for clip in clips:
        t = clip_targets(json.dumps(gt), clip.start_s, len(clip.frames), cfg)
        assert t.boxes.shape == (5, len(gt["objects"]), 4) and t.sounding.shape == (5, len(gt["objects"]))
        assert t.caption == gt["caption"]
        for j, frame in enumerate(clip.frames):
            for k in range(len(gt["objects"])):
                x0, y0, x1, y1 = t.boxes[j, k]
                cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
                # the box centre is on the object, not on the background
                assert np.abs(frame[cy - 1:cy + 2, cx - 1:cx + 2].astype(int) - background).max() > 40
    src = np.floor(0.0 * 10 + np.arange(5) / 5 * 10 + 1e-6).astype(int)  # frames 0, 2, 4, 6, 8
    first = clip_targets(gt, 0.0, 5, cfg)
    np.testing.assert_array_equal(first.sounding[:, 0], np.asarray(gt["objects"][0]["sounding"])[src])


def test_clip_caption_names_what_sounds_in_the_clip():
    from pipelines.groundtruth import clip_caption

    def obj(i, colour, shape, sound, segments, x):
        return {"id": i, "shape": shape, "colour": colour, "texture": "solid", "sound": sound,
                "boxes": [[x, 10, x + 20, 30]] * 40, "segments": segments,
                "sounding": [any(a <= (f + 0.5) / 10 < b for a, b in segments) for f in range(40)]}
    gt = {"fps": 10, "num_frames": 40, "size": 96, "caption": "whole video",
          "objects": [obj(0, "red", "circle", "tone_220", [[0.0, 2.5]], 5),        # left, sounds 0-2.5 s
                      obj(1, "blue", "square", "clicks_2", [[2.0, 4.0]], 70)]}    # right, sounds 2-4 s
    assert clip_caption(gt, 0.0, 1.0) == "a red circle on the left hums while a blue square on the right is silent"
    assert clip_caption(gt, 3.0, 4.0) == "a blue square on the right clicks while a red circle on the left is silent"
