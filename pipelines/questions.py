"""Question/answer pairs per clip: generated from a synthetic scene's ground truth for the clip's
own span (as `pipelines.groundtruth.clip_caption` cuts captions), or carried in a `qa` column.

Question types (`TYPES`; the first seven need the sound, `count_objects` only the pictures):

    type              question                                         answer            asked when (in the clip)
    sounding_colour   what colour is the sounding object?              a colour          exactly one object sounds
    sounding_shape    what shape is the sounding object?               a shape           exactly one object sounds
    is_sounding       is the <colour> <shape> sounding?                yes / no          one sounding AND one silent object:
                                                                                         both are asked (yes and no, 50/50)
    count_sounding    how many objects are sounding?                   zero, one, ...    always
    where_sounding    where is the sounding object?                    left/centre/right exactly one sounds, not near a third
    first_sounding    what colour is the object that sounds first?     a colour          >= 2 sound; the first starts
                                                                                         >= FIRST_MARGIN_S before the next
    silent            what colour is the silent object?                a colour          exactly one is silent, others sound
    count_objects     how many objects are there?                      zero, one, ...    always

An object *sounds* in a clip when its segments overlap the clip by >= MIN_SOUND_S, is *silent*
when they do not overlap it at all; in between (a sound cut by the clip's edge) it is ambiguous,
and no question whose answer depends on it is asked. An object already sounding at the clip's
start starts at the start. `where`: the x thirds of the mean box centre over the object's
sounding frames in the clip (the caption grammar's rule, pipelines/synth.py), not asked within
PLACE_MARGIN of a third's edge. Only present objects are asked about, so "is X sounding?" needs
the sound (is X heard?), not the sight (is X there?). A clip has at most MAX_QUESTIONS questions.

A `qa` column (a manifest's, e.g. `avray manifest music-avqa`) holds a JSON list of
{"question", "answer", "type"} per video (type optional: "user"); every clip of the video gets
them (`parse_qa`). When a row has both, `qa` wins.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Sequence

import numpy as np

from pipelines.groundtruth import scene_of
from pipelines.synth_audio import COLOURS, SHAPES

MIN_SOUND_S = 0.25  # overlap with the clip that counts as sounding in it
FIRST_MARGIN_S = 0.25  # "sounds first": the first onset leads the second by at least this
PLACE_MARGIN = 0.04  # "where": not asked when the centre is within this fraction of the side of a third's edge
MAX_QUESTIONS = 8  # questions per clip: the generator asks at most 8 (3 objects), user pairs are sampled down
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                            "eleven", "twelve")  # up to the 12 kinds of SOUND_TABLE
PLACES: tuple[str, ...] = ("left", "centre", "right")
TYPES: tuple[str, ...] = ("sounding_colour", "sounding_shape", "is_sounding", "count_sounding", "where_sounding",
                          "first_sounding", "silent", "count_objects")
SOUND_TYPES: tuple[str, ...] = TYPES[:7]  # the types that need the sound
USER_TYPE = "user"
TEMPLATES: dict[str, str] = {
    "sounding_colour": "what colour is the sounding object?",
    "sounding_shape": "what shape is the sounding object?",
    "is_sounding": "is the {colour} {shape} sounding?",
    "count_sounding": "how many objects are sounding?",
    "where_sounding": "where is the sounding object?",
    "first_sounding": "what colour is the object that sounds first?",
    "silent": "what colour is the silent object?",
    "count_objects": "how many objects are there?",
}


def _qa(qtype: str, answer: str, **fields: str) -> dict[str, str]:
    return {"question": TEMPLATES[qtype].format(**fields), "answer": answer, "type": qtype}


def _place(mean_x: float, size: float) -> str | None:
    """x thirds of a centre (the caption grammar's rule); None within PLACE_MARGIN of an edge."""
    for edge in (size / 3, 2 * size / 3):
        if abs(mean_x - edge) < PLACE_MARGIN * size:
            return None
    return "left" if mean_x < size / 3 else "right" if mean_x >= 2 * size / 3 else "centre"


def clip_questions(ground_truth: str | dict[str, Any], start_s: float, end_s: float, key: int = 0) -> list[dict[str, str]]:
    """The questions of the clip [start_s, end_s) of a scene (ground truth JSON or dict, the
    format of pipelines/synth.py), each {"question", "answer", "type"}, in TYPES order; `key`
    seeds the choice among several candidates (the object asked about in is_sounding)."""
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    objs = gt["objects"]
    lo = min(int(np.floor(start_s * gt["fps"] + 1e-6)), gt["num_frames"] - 1)
    hi = max(lo + 1, min(int(np.ceil(end_s * gt["fps"] - 1e-6)), gt["num_frames"]))
    overlap = [sum(max(0.0, min(b, end_s) - max(a, start_s)) for a, b in o["segments"]) for o in objs]
    sounding = [i for i, v in enumerate(overlap) if v >= MIN_SOUND_S]
    silent = [i for i, v in enumerate(overlap) if v == 0.0]
    clear = len(sounding) + len(silent) == len(objs)  # no object half-heard at the clip's edge
    out: list[dict[str, str]] = []
    one = objs[sounding[0]] if clear and len(sounding) == 1 else None
    if one is not None:
        out.append(_qa("sounding_colour", one["colour"]))
        out.append(_qa("sounding_shape", one["shape"]))
    if sounding and silent:
        rng = np.random.default_rng([key & 0xFFFFFFFF, 22])
        yes, no = objs[sounding[rng.integers(len(sounding))]], objs[silent[rng.integers(len(silent))]]
        pair = [_qa("is_sounding", "yes", colour=yes["colour"], shape=yes["shape"]),
                _qa("is_sounding", "no", colour=no["colour"], shape=no["shape"])]
        out += pair[::-1] if rng.random() < 0.5 else pair
    if clear:
        out.append(_qa("count_sounding", NUMBERS[len(sounding)]))
    if one is not None:
        boxes = np.asarray(one["boxes"], np.float64)[lo:hi]  # (T, 4) source frames of the clip
        on = np.asarray(one["sounding"], bool)[lo:hi]
        cx = ((boxes[:, 0] + boxes[:, 2]) / 2)[on if on.any() else slice(None)].mean()
        place = _place(float(cx), float(gt["size"]))
        if place is not None:
            out.append(_qa("where_sounding", place))
    if clear and len(sounding) >= 2:
        onsets = sorted((min(max(a, start_s) for a, b in objs[i]["segments"] if min(b, end_s) > max(a, start_s)), i)
                        for i in sounding)
        if onsets[1][0] - onsets[0][0] >= FIRST_MARGIN_S:
            out.append(_qa("first_sounding", objs[onsets[0][1]]["colour"]))
    if clear and len(silent) == 1 and sounding:
        out.append(_qa("silent", objs[silent[0]]["colour"]))
    out.append(_qa("count_objects", NUMBERS[len(objs)]))
    return out


def parse_qa(value: Any) -> list[dict[str, str]]:
    """A `qa` cell (a JSON string or a list of dicts) -> [{"question", "answer", "type"}];
    ValueError naming what is wrong."""
    items = json.loads(value) if isinstance(value, (str, bytes)) else value
    if not isinstance(items, (list, tuple, np.ndarray)):
        raise ValueError(f"qa must be a JSON list of {{question, answer, type}}, got {type(items).__name__}")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("question"), str) or not isinstance(it.get("answer"), str):
            raise ValueError(f"qa[{i}] must be an object with string 'question' and 'answer', got {it!r}")
        if not it["question"].strip() or not it["answer"].strip():
            raise ValueError(f"qa[{i}] has an empty question or answer")
        out.append({"question": it["question"], "answer": it["answer"].strip().lower(),
                    "type": str(it.get("type") or USER_TYPE)})
    return out


def clip_key(video_id: str, start_s: float) -> int:
    """A stable integer per clip (seeds the choices made for it, the same in every epoch)."""
    return zlib.crc32(f"{video_id}:{float(start_s):.3f}".encode())


def batch_questions(batch: dict[str, Any]) -> list[list[dict[str, str]]]:
    """Questions of each clip row of a batch (columns video_id, start_s, end_s and `qa` and/or
    `ground_truth`): its `qa` pairs when it has them, else its scene's generated questions, at
    most MAX_QUESTIONS (more user pairs: a sample fixed per clip). ValueError for a row with neither."""
    gts, qas = batch.get("ground_truth"), batch.get("qa")
    parsed: dict[str, Any] = {}  # every clip of a scene carries the same JSON: parse it once
    out = []
    for i, vid in enumerate(batch["video_id"]):
        key = clip_key(str(vid), float(batch["start_s"][i]))
        if qas is not None and qas[i] is not None:
            qs = parse_qa(qas[i])
        elif gts is not None and gts[i] is not None:
            qs = clip_questions(scene_of(gts[i], parsed), float(batch["start_s"][i]), float(batch["end_s"][i]), key)
        else:
            raise ValueError(f"clip of video {vid} has neither ground_truth nor qa")
        if len(qs) > MAX_QUESTIONS:
            pick = np.sort(np.random.default_rng([key, 7]).choice(len(qs), MAX_QUESTIONS, replace=False))
            qs = [qs[j] for j in pick]
        out.append(qs)
    return out


def template_questions() -> list[str]:
    """Every question the generator can ask (the words a model must know)."""
    qs = [t for k, t in TEMPLATES.items() if "{" not in t]
    qs += [TEMPLATES["is_sounding"].format(colour=c, shape=s) for c in COLOURS for s in SHAPES]
    return qs


def template_answers() -> tuple[str, ...]:
    """Every answer the generator can give, in a fixed order."""
    return tuple(COLOURS) + SHAPES + ("yes", "no") + NUMBERS + PLACES


def answer_vocabulary(answers: Sequence[str]) -> tuple[str, ...]:
    """template_answers, then the other answers seen (descending count, then alphabetically)."""
    from collections import Counter

    base = template_answers()
    counts = Counter(a for a in answers if a not in base)
    return base + tuple(sorted(counts, key=lambda a: (-counts[a], a)))


def type_vocabulary(types: Sequence[str]) -> tuple[str, ...]:
    """TYPES, then the other types seen, alphabetically."""
    return TYPES + tuple(sorted(set(types) - set(TYPES)))
