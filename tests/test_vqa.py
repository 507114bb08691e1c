"""The AV question answerer (models/vqa.py) and its task (jobs/tasks/vqa.py): shapes, the Hadamard
fusion against hand-computed values, the loss, evaluation against a model whose answers are known,
and serving a real upload: answers, top 5 and the 422 for an unknown word."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from jobs.tasks import get
from jobs.tasks.base import RequestError
from models.text import SPECIALS
from models.vqa import NO_ANSWER, PRESETS, UNKNOWN_ANSWER, AVQuestionAnswerer, VQAConfig, hadamard, vqa_loss
from pipelines.clipsettings import ClipSettings
from pipelines.questions import MAX_QUESTIONS, TYPES

TASK = get("vqa")
WORDS = SPECIALS + ("is", "the", "red", "circle", "sounding", "how", "many")
SMALL = replace(PRESETS["tiny"], vocab=WORDS, answers=("yes", "no", "one", "two"), types=TYPES, dim=24,
                embed_dim=8, hidden_dim=12, attention_dim=10, audio_bins=3)


def model(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    return AVQuestionAnswerer(cfg).eval()


def inputs(B=3, Q=5, L=7, T=2, H=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(B, T, 3, H, H, generator=g)
    mel = torch.randn(B, 64, 37, generator=g)
    qs = torch.randint(4, len(WORDS), (B, Q, L), generator=g)
    qs[:, :, 0], qs[:, :, -2:] = 1, 0  # <bos> ... and two pads
    return frames, mel, qs


def test_hadamard_by_hand():
    a, b, c = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]), torch.tensor([0.5, 1.0, -1.0])
    assert hadamard(a, b, c).tolist() == [2.0, 10.0, -18.0]
    assert hadamard(torch.tensor([[1.0], [2.0]]), torch.tensor([3.0, 4.0])).tolist() == [[3.0, 4.0], [6.0, 8.0]]


def test_shapes_and_attention_rows():
    m = model()
    frames, mel, qs = inputs()
    out = m(frames, mel, qs)
    assert out["logits"].shape == (3, 5, 4) and out["attention"].shape == (3, 5, 2 * 5 * 5)  # 40 px -> 5 x 5 cells, 2 frames
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(3, 5))
    assert m.encode_video(frames).shape == (3, 50, 24) and m.encode_audio(mel).shape == (3, 24)
    assert m.encode_questions(qs.flatten(0, 1)).shape == (15, 24)
    assert m(None, None, qs)["attention"].shape == (3, 5, 1)
    pooled = model(replace(SMALL, glimpses=0))(frames, mel, qs)  # the classic fusion: mean over the cells
    assert pooled["logits"].shape == (3, 5, 4)
    torch.testing.assert_close(pooled["attention"], torch.full((3, 5, 50), 1 / 50))
    one = model(replace(SMALL, glimpses=1))
    assert one(frames, mel, qs)["logits"].shape == (3, 5, 4) and one.att_out.weight.shape == (1, 10)
    assert model().att_out.weight.shape == (2, 10) and model().visual_out.weight.shape == (24, 3 * 24)  # [mean; 2 glimpses]


def test_fusion_is_the_pointwise_product_of_the_streams():
    """With the classifier taken out, the output is v ⊙ q ⊙ a: checked with the absent vectors set
    by hand (question only) and with every stream (the attended, projected cells)."""
    m = model()
    m.classifier = nn.Identity()
    frames, mel, qs = inputs(B=2, Q=3)
    with torch.no_grad():
        m.no_audio.copy_(torch.linspace(-1, 1, 24))
        m.no_video.copy_(torch.full((24,), 0.5))
        q = m.encode_questions(qs.flatten(0, 1)).reshape(2, 3, 24)
        torch.testing.assert_close(m(None, None, qs)["logits"], q * torch.linspace(-1, 1, 24) * 0.5)
        a = m.encode_audio(mel)[:, None].expand(2, 3, 24)
        cells = m.encode_video(frames)
        e = m.att_out(torch.tanh(m.att_cells(cells))[:, None] * torch.tanh(m.att_query(q * a))[:, :, None])  # (B, Q, P, 2)
        alpha = e.softmax(dim=2)
        glimpses = [torch.einsum("bqp,bpd->bqd", alpha[..., k], cells) for k in range(2)]
        mean = cells.mean(dim=1)[:, None].expand(2, 3, 24)
        v = torch.tanh(m.visual_out(torch.cat([mean] + glimpses, dim=-1)))
        out = m(frames, mel, qs)
        torch.testing.assert_close(out["logits"], v * q * a)
        torch.testing.assert_close(out["attention"], alpha.mean(dim=-1))


def test_batched_equals_single_clips_and_question_padding_is_ignored():
    m = model()
    frames, mel, qs = inputs()
    together = m(frames, mel, qs)["logits"]
    alone = torch.cat([m(frames[i:i + 1], mel[i:i + 1], qs[i:i + 1])["logits"] for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    longer = torch.cat([qs, torch.zeros(3, 5, 4, dtype=torch.long)], dim=2)  # more pads change nothing
    torch.testing.assert_close(m(frames, mel, longer)["logits"], together, atol=1e-6, rtol=1e-6)


def test_empty_slots_are_zero_and_change_nothing_else():
    m = model()
    frames, mel, qs = inputs()
    full = m(frames, mel, qs)
    holes = qs.clone()
    holes[0, 1], holes[2, 4] = 0, 0  # two empty slots
    out = m(frames, mel, holes)
    assert out["logits"][0, 1].abs().sum() == 0 and out["attention"][2, 4].abs().sum() == 0
    kept = torch.ones(3, 5, dtype=torch.bool)
    kept[0, 1] = kept[2, 4] = False
    torch.testing.assert_close(out["logits"][kept], full["logits"][kept], atol=1e-6, rtol=1e-6)


def test_training_drops_streams_and_gradients_reach_every_part():
    m = model(replace(SMALL, audio_dropout=1.0, video_dropout=1.0, dropout=0.0)).train()
    frames, mel, qs = inputs()
    dropped = m(frames, mel, qs)["logits"]  # every stream dropped: the question-only answer
    torch.testing.assert_close(dropped, m(None, None, qs)["logits"])
    m = model(replace(SMALL, audio_dropout=0.0, video_dropout=0.0)).train()
    answers = torch.tensor([[0, 1, NO_ANSWER, 2, UNKNOWN_ANSWER]] * 3)
    vqa_loss(m(frames, mel, qs)["logits"], answers)["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in m.named_parameters()
               if not n.startswith("no_"))


def test_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [5.0, 1.0]]])  # (1, 3, 2)
    out = vqa_loss(logits, torch.tensor([[0, NO_ANSWER, 1]]))  # slot 2 wrong, slot 1 empty
    expected = (np.log(1 + np.exp(-2.0)) + np.log(1 + np.exp(4.0))) / 2
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6) and out["accuracy"].item() == 0.5
    assert vqa_loss(logits, torch.full((1, 3), NO_ANSWER))["loss"].item() == 0.0


def test_config_errors():
    with pytest.raises(ValueError, match="vocab must start with"):
        VQAConfig(vocab=("a",))
    with pytest.raises(ValueError, match="answers must be non-empty without duplicates"):
        VQAConfig(answers=("yes", "yes"))
    with pytest.raises(ValueError, match="glimpses >= 0"):
        VQAConfig(glimpses=-1)
    with pytest.raises(ValueError, match="3 frames exceed max_frames=2"):
        model(replace(SMALL, max_frames=2))(*inputs(T=3))


class Known(nn.Module):
    """Answers right with both streams, right only on slot 0 without audio, always answer 1 otherwise."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def forward(self, frames, logmel, questions):
        B, Q = questions.shape[:2]
        right = torch.nn.functional.one_hot(self.answers.clamp_min(0), 4).float()
        wrong = torch.nn.functional.one_hot(torch.ones(B, Q, dtype=torch.long), 4).float()
        if frames is not None and logmel is not None:
            return {"logits": right}
        if frames is not None:
            return {"logits": torch.cat([right[:, :1], wrong[:, 1:]], dim=1)}
        return {"logits": wrong}


def test_evaluate_scores_every_question_per_type_and_condition():
    answers = torch.tensor([[0, 1, 2, NO_ANSWER], [1, UNKNOWN_ANSWER, 3, 1]])  # 7 questions, one answer unknown
    qtypes = torch.tensor([[2, 2, 7, -1], [2, 2, 7, 3]])  # is_sounding x 4, count_objects x 2, count_sounding x 1
    batch = {"frames": torch.zeros(2, 1, 3, 8, 8), "logmel": torch.zeros(2, 64, 9),
             "questions": torch.ones(2, 4, 3, dtype=torch.long), "answers": answers, "qtypes": qtypes}
    m = TASK.evaluate(Known(answers), [batch], SMALL)
    assert m["questions"] == 7 and m["questions_is_sounding"] == 4 and m["questions_count_objects"] == 2
    assert m["acc_av"] == pytest.approx(6 / 7)  # the unknown answer is scored wrong
    assert m["acc_av_is_sounding"] == 0.75 and m["acc_av_count_objects"] == 1.0 and m["acc_av_count_sounding"] == 1.0
    assert m["acc_no_audio"] == pytest.approx(4 / 7)  # slot 0 of each clip right, and answer 1 at [0, 1], [1, 3]
    assert m["acc_question_only"] == pytest.approx(3 / 7)  # answer 1 everywhere: [0, 1], [1, 0], [1, 3]
    assert m["acc_av_sound"] == pytest.approx((0.75 + 1.0) / 2)  # mean over the sound types present
    assert m["majority_is_sounding"] == 0.5 and m["majority"] == pytest.approx(4 / 7)  # answers 1, 2 and 1 per type
    assert TASK.headline(m) == ("88% right on the sound questions with audio, 88% without; question only 43% "
                                "(majority 57%); 7 questions")
    assert TASK.headline({}) == "too few clips to score (0)"


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    from pipelines.synth import make_scene, write_scene

    d = tmp_path_factory.mktemp("vqa-upload")
    gt = write_scene(make_scene(7, 0, seconds=2.0, size=48), d)
    return (d / gt["video"]).read_bytes()


def test_serving_an_upload_answers_with_top5(upload):
    settings = ClipSettings(clip_seconds=1.0, fps=8.0, size=40)
    cfg = replace(TASK.fit(TASK.presets["tiny"], lambda cols: {}), dim=24, embed_dim=8, hidden_dim=12, attention_dim=10)
    m = model(cfg)
    opts = {"question": "Is the red circle sounding?", "sound": True}
    item, meta = TASK.from_upload(upload, cfg, settings, options=opts, max_pixels=10**6, max_seconds=60)
    assert item["frames"].shape == (2, 1, 3, 40, 40) and item["logmel"].shape[0] == 2 and meta["audio_used"] is True
    muted, mmeta = TASK.from_upload(upload, cfg, settings, options={**opts, "sound": False}, max_pixels=10**6, max_seconds=60)
    assert muted["logmel"] is None and mmeta["audio_used"] is False
    results = TASK.infer(m, [item, muted, item], torch.device("cpu"))
    assert [r.shape for r in results] == [(2, len(cfg.answers))] * 3
    np.testing.assert_allclose(results[0], results[2], atol=1e-6)
    np.testing.assert_allclose(results[0].sum(axis=1), 1.0, atol=1e-5)
    body = json.loads(json.dumps(TASK.answer(results[0], meta, opts).body))
    mean = results[0].mean(axis=0)
    assert body["answer"] == cfg.answers[int(mean.argmax())] and body["probability"] == round(float(mean.max()), 4)
    assert [t["answer"] for t in body["top5"]] == [cfg.answers[k] for k in np.argsort(-mean, kind="stable")[:5]]
    assert len(body["top5"]) == 5 and body["top5"][0]["answer"] == body["answer"] and body["audio_used"] is True
    assert [c["start_s"] for c in body["clips"]] == [0.0, 1.0] and body["clips"][0]["end_s"] == 1.0


@pytest.mark.parametrize("question,message", [
    ("is the purple circle humming?", "unknown word(s) in the question: humming, purple (the model knows"),
    ("?!", "the question has no words"),
    ("is " * 15, "the question has 15 words; at most 14"),
])
def test_bad_questions_are_422(upload, question, message):
    cfg = TASK.fit(TASK.presets["tiny"], lambda cols: {})
    with pytest.raises(RequestError, match=re.escape(message)) as e:
        TASK.from_upload(upload, cfg, ClipSettings(clip_seconds=1.0, fps=8.0, size=40),
                         options={"question": question, "sound": True}, max_pixels=10**6, max_seconds=60)
    assert e.value.status == 422


def test_prepare_widths_are_fixed(upload, tmp_path):
    """Rows of clips with different numbers of questions prepare to the same widths."""
    from tests.test_tasks import ingest
    from pipelines.synth import make_scene, write_scene

    rows = []
    for i in range(2):
        gt = write_scene(make_scene(7, i + 1, seconds=2.0, size=48), tmp_path)
        rows.append({"path": gt["video"], "ground_truth": json.dumps(gt)})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = ingest([str(tmp_path / "m.jsonl")], tmp_path / "out", ClipSettings(clip_seconds=1.0, fps=8.0, size=40))
    cfg = TASK.fit(TASK.presets["tiny"], lambda cols: {c: batch[c] for c in cols if c in batch})
    x = TASK.prepare(batch, cfg)
    assert x["frames"].shape == (4, 1, 3, 40, 40) and x["questions"].shape == (4, MAX_QUESTIONS, 16)
    assert x["answers"].shape == x["qtypes"].shape == (4, MAX_QUESTIONS) and x["answers"].dtype == np.int64
    filled = (x["answers"] != NO_ANSWER).sum(axis=1)
    assert (filled >= 1).all() and ((x["qtypes"] >= 0) == (x["answers"] != NO_ANSWER)).all()
    assert ((x["questions"][:, :, 0] == 1) == (x["answers"] != NO_ANSWER)).all()  # <bos> exactly in the used slots
