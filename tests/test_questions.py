"""The question generator (pipelines/questions.py): answers against hand-built scene ground truth
and against what each generated scene's segments and boxes say; the `qa` column; the vocabularies."""
import json
from collections import Counter

import numpy as np
import pytest

from pipelines.questions import (MAX_QUESTIONS, MIN_SOUND_S, NUMBERS, TYPES, answer_vocabulary, batch_questions,
                                 clip_key, clip_questions, parse_qa, template_answers, template_questions, type_vocabulary)
from pipelines.synth import ground_truth, make_scene

FPS, SIZE = 10, 64


def obj(i, colour, shape, cx, segments):
    """A ground-truth object at a fixed box centred on x = cx, sounding on `segments` (2 s, 10 fps)."""
    t = (np.arange(2 * FPS) + 0.5) / FPS  # mid-frame times
    sounding = [any(a <= x < b for a, b in segments) for x in t]
    return {"id": i, "shape": shape, "colour": colour, "texture": "solid", "sound": "tone_220",
            "boxes": [[cx - 6, 20, cx + 6, 32]] * (2 * FPS), "sounding": sounding, "segments": segments}


def scene(*objects):
    return {"fps": FPS, "size": SIZE, "num_frames": 2 * FPS, "objects": list(objects)}


# a red circle on the left sounds 0-1 s, a green square in the centre 0.5-2 s, a blue triangle on
# the right never
GT = scene(obj(0, "red", "circle", 10, [[0.0, 1.0]]), obj(1, "green", "square", 32, [[0.5, 2.0]]),
           obj(2, "blue", "triangle", 54, []))


def asked(qs):
    return {(q["type"], q["question"]): q["answer"] for q in qs}


def test_whole_clip_two_sound_one_is_silent():
    qs = clip_questions(GT, 0.0, 2.0, key=1)
    a = asked(qs)
    assert a.pop(("count_sounding", "how many objects are sounding?")) == "two"
    assert a.pop(("first_sounding", "what colour is the object that sounds first?")) == "red"  # 0.0 s vs 0.5 s
    assert a.pop(("silent", "what colour is the silent object?")) == "blue"
    assert a.pop(("count_objects", "how many objects are there?")) == "three"
    yes_no = {k: v for k, v in a.items() if k[0] == "is_sounding"}
    assert sorted(yes_no.values()) == ["no", "yes"] and len(a) == 2  # one of each, nothing else
    assert ("is_sounding", "is the blue triangle sounding?") in yes_no and yes_no[("is_sounding", "is the blue triangle sounding?")] == "no"
    assert set(yes_no) - {("is_sounding", "is the blue triangle sounding?")} <= {
        ("is_sounding", "is the red circle sounding?"), ("is_sounding", "is the green square sounding?")}
    assert [q["type"] for q in qs] == sorted((q["type"] for q in qs), key=TYPES.index)


def test_second_half_one_sounds_and_where_it_is():
    a = asked(clip_questions(GT, 1.0, 2.0, key=0))  # red stopped at 1.0: only green sounds
    assert a.pop(("sounding_colour", "what colour is the sounding object?")) == "green"
    assert a.pop(("sounding_shape", "what shape is the sounding object?")) == "square"
    assert a.pop(("count_sounding", "how many objects are sounding?")) == "one"
    assert a.pop(("where_sounding", "where is the sounding object?")) == "centre"
    assert a.pop(("count_objects", "how many objects are there?")) == "three"
    assert a.pop(("is_sounding", "is the green square sounding?")) == "yes"
    (k, v), = a.items()  # two silent objects: no "silent" question, one of them asked about
    assert k in {("is_sounding", "is the red circle sounding?"), ("is_sounding", "is the blue triangle sounding?")} and v == "no"


def test_a_sound_cut_by_the_clip_edge_is_not_asked_about():
    # [0.9, 1.9): red overlaps 0.1 s (< MIN_SOUND_S: neither sounding nor silent), green 1.0 s
    assert 0 < 0.1 < MIN_SOUND_S
    a = asked(clip_questions(GT, 0.9, 1.9, key=3))
    assert a == {("is_sounding", "is the green square sounding?"): "yes",
                 ("is_sounding", "is the blue triangle sounding?"): "no",
                 ("count_objects", "how many objects are there?"): "three"}


def test_first_needs_a_clear_lead_and_where_a_clear_third():
    close = scene(obj(0, "red", "circle", 21, [[0.0, 2.0]]), obj(1, "green", "square", 50, [[0.1, 2.0]]))
    a = asked(clip_questions(close, 0.0, 2.0))
    assert "first_sounding" not in {t for t, _ in a}  # 0.1 s apart < FIRST_MARGIN_S
    edge = scene(obj(0, "yellow", "circle", 21, [[0.0, 2.0]]))  # 21.3 is the left third's edge: 21 is too close
    assert "where_sounding" not in {t for t, _ in asked(clip_questions(edge, 0.0, 2.0))}
    right = scene(obj(0, "yellow", "circle", 50, [[0.0, 2.0]]))
    assert asked(clip_questions(right, 0.0, 2.0))[("where_sounding", "where is the sounding object?")] == "right"


def test_nothing_sounds():
    a = asked(clip_questions(scene(obj(0, "red", "circle", 10, [])), 0.0, 2.0))
    assert a == {("count_sounding", "how many objects are sounding?"): "zero",
                 ("count_objects", "how many objects are there?"): "one"}


def test_generated_scenes_answers_match_their_ground_truth():
    """On 30 scenes of make_scene (both 2 s clips each), every answer is what the segments and
    boxes say, derived here independently; yes and no are equally many; at most MAX_QUESTIONS."""
    counts = Counter()
    for i in range(30):
        gt = json.loads(json.dumps(ground_truth(make_scene(4, i, seconds=4.0, size=SIZE, fps=FPS))))
        for start in (0.0, 2.0):
            qs = clip_questions(gt, start, start + 2.0, key=i)
            assert 1 <= len(qs) <= MAX_QUESTIONS
            heard = {(o["colour"], o["shape"]): sum(max(0, min(b, start + 2) - max(a, start)) for a, b in o["segments"])
                     for o in gt["objects"]}
            loud = [k for k, v in heard.items() if v >= MIN_SOUND_S]
            for q in qs:
                counts[q["type"], q["answer"]] += 1
                if q["type"] == "is_sounding":
                    colour, shape = q["question"].rstrip("?").split()[2:4]
                    v = heard[(colour, shape)]
                    assert q["answer"] == ("yes" if v >= MIN_SOUND_S else "no") and (v == 0.0 or v >= MIN_SOUND_S)
                elif q["type"] == "sounding_colour":
                    assert len(loud) == 1 and q["answer"] == loud[0][0]
                elif q["type"] == "sounding_shape":
                    assert len(loud) == 1 and q["answer"] == loud[0][1]
                elif q["type"] == "count_sounding":
                    assert q["answer"] == NUMBERS[len(loud)]
                elif q["type"] == "count_objects":
                    assert q["answer"] == NUMBERS[len(gt["objects"])]
                elif q["type"] == "silent":
                    quiet = [k for k, v in heard.items() if v == 0]
                    assert len(quiet) == 1 and q["answer"] == quiet[0][0] and loud
                elif q["type"] == "first_sounding":
                    onset = {k: min(max(a, start) for a, b in o["segments"] if min(b, start + 2) > max(a, start))
                             for o in gt["objects"] for k in [(o["colour"], o["shape"])] if k in loud}
                    first = min(onset, key=onset.get)
                    assert q["answer"] == first[0] and sorted(onset.values())[1] - onset[first] >= 0.25
                elif q["type"] == "where_sounding":
                    o = next(o for o in gt["objects"] if (o["colour"], o["shape"]) == loud[0])
                    lo, hi = int(start * FPS), int((start + 2) * FPS)
                    b, on = np.asarray(o["boxes"])[lo:hi], np.asarray(o["sounding"])[lo:hi]
                    cx = ((b[:, 0] + b[:, 2]) / 2)[on].mean()
                    assert q["answer"] == ("left" if cx < SIZE / 3 else "right" if cx >= 2 * SIZE / 3 else "centre")
    assert counts["is_sounding", "yes"] == counts["is_sounding", "no"] > 0
    assert {t for t, _ in counts} == set(TYPES)  # 60 clips ask every type


def test_clip_choices_are_fixed_per_key():
    assert clip_questions(GT, 0.0, 2.0, key=5) == clip_questions(GT, 0.0, 2.0, key=5)
    picked = {tuple(q["question"] for q in clip_questions(GT, 0.0, 2.0, key=k) if q["type"] == "is_sounding")
              for k in range(20)}
    assert len(picked) > 1  # the key chooses which sounding object is asked, and the order


def test_parse_qa_and_its_errors():
    assert parse_qa('[{"question": "Is it loud?", "answer": "Yes ", "type": "AV"}, {"question": "q", "answer": "a"}]') == [
        {"question": "Is it loud?", "answer": "yes", "type": "AV"}, {"question": "q", "answer": "a", "type": "user"}]
    with pytest.raises(ValueError, match="qa must be a JSON list"):
        parse_qa('{"question": "q"}')
    with pytest.raises(ValueError, match=r"qa\[1\] must be an object with string 'question' and 'answer'"):
        parse_qa([{"question": "q", "answer": "a"}, {"question": "q"}])
    with pytest.raises(ValueError, match=r"qa\[0\] has an empty question or answer"):
        parse_qa([{"question": " ", "answer": "a"}])


def test_batch_questions_qa_wins_and_is_sampled_down_per_clip():
    many = json.dumps([{"question": f"question {i}", "answer": str(i)} for i in range(12)])
    batch = {"video_id": np.array(["v1", "v1", "v2"], object), "start_s": np.array([0.0, 2.0, 0.0]),
             "end_s": np.array([2.0, 4.0, 2.0]), "ground_truth": np.array([json.dumps(GT)] * 3, object),
             "qa": np.array([many, many, None], object)}
    out = batch_questions(batch)
    assert [len(q) for q in out] == [MAX_QUESTIONS, MAX_QUESTIONS, len(clip_questions(GT, 0.0, 2.0))]
    assert out[0] != out[1] and out[0] == batch_questions(batch)[0]  # a sample per clip, the same every time
    assert all(q["type"] == "user" for q in out[0])
    assert out[2] == clip_questions(GT, 0.0, 2.0, key=clip_key("v2", 0.0))  # no qa: the scene's questions
    with pytest.raises(ValueError, match="clip of video v2 has neither ground_truth nor qa"):
        batch_questions({"video_id": np.array(["v2"], object), "start_s": np.array([0.0]), "end_s": np.array([2.0])})


def test_vocabularies():
    assert len(template_questions()) == 7 + 12  # 7 fixed questions + "is the <colour> <shape> sounding?" x 12 kinds
    assert template_answers()[:9] == ("red", "green", "blue", "yellow", "circle", "square", "triangle", "yes", "no")
    assert answer_vocabulary(["cello", "yes", "piano", "cello"])[-2:] == ("cello", "piano")
    assert type_vocabulary(["user", "Audio-Visual/Counting", "count_objects"]) == TYPES + ("Audio-Visual/Counting", "user")
