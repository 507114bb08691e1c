"""Audio-visual question answering: ask a video a question, answered from its pictures and its sound.

Each clip row is one training example with MAX_QUESTIONS question slots (pipelines.questions: the
questions its scene's ground truth gives for the clip's own span, or a `qa` column's pairs), so a
clip's frames and sound go through the encoders once for all of its questions, and every prepared
row is as wide. The question words, the answers and the question types are fitted on the training
rows (`fit`: every question the generator can ask plus those seen) and stored in the model config.
Evaluation scores every question of every held-out clip, per type, with both streams and with the
sound, the pictures or both taken away (the language prior). A served upload is asked the same
question for each of its clips; the answer averages the clips' answer distributions.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np
import torch

from jobs.tasks.base import Answer, Option, Route, RequestError, Task, channels_first, chunked, per_item, save_figure, to_model
from models.text import PAD, _index, build_vocab, encode, tokenize
from models.vqa import NO_ANSWER, PRESETS, UNKNOWN_ANSWER, AVQuestionAnswerer, VQAConfig, vqa_loss
from pipelines.clipsettings import ClipSettings
from pipelines.questions import (MAX_QUESTIONS, SOUND_TYPES, answer_vocabulary, batch_questions, template_questions,
                                 type_vocabulary)
from pipelines.schema import decode_clip_batch

QUESTION_IDS = 16  # <bos> + up to 14 words + <eos>, padded to this many ids
DEFAULT_QUESTION = "how many objects are sounding?"
CONDITIONS = ("av", "no_audio", "no_video", "question_only")  # which streams the model is given


class QuestionAnswering(Task):
    name = "vqa"
    config, model, presets = VQAConfig, AVQuestionAnswerer, PRESETS
    columns = ("video_id", "start_s", "end_s", "frames", "frames_shape", "logmel", "logmel_shape", "ground_truth", "qa")
    deployment = "QuestionAnswerer"
    route = Route(
        "/v1/ask", upload="video or image", image_ok=True, needs_audio=False,
        summary="Answer a question about a video: the answer, its probability and the top 5 (a video without "
                "sound, or a still image, is answered without sound).",
        options=(Option("question", str, DEFAULT_QUESTION, "the question, in the model's words", where="form",
                        checks={"min_length": 1, "max_length": 500}),
                 Option("sound", bool, True, "false: answer as if the video were silent")))

    # -- training ---------------------------------------------------------------------------

    def fit(self, cfg: VQAConfig, read: Callable[[list[str]], dict[str, Any]]) -> VQAConfig:
        """Question words: every question the generator can ask plus the training rows' questions;
        answers and types: the generator's, then those seen in the training rows."""
        import dataclasses
        import logging

        rows = read([c for c in self.columns if c not in ("frames", "frames_shape", "logmel", "logmel_shape")])
        asked = ([q for qs in batch_questions(rows) for q in qs]
                 if "ground_truth" in rows or "qa" in rows else [])
        vocab = build_vocab(template_questions() + [q["question"] for q in asked])
        answers = answer_vocabulary([q["answer"] for q in asked])
        types = type_vocabulary([q["type"] for q in asked])
        logging.getLogger(__name__).info("%d question words, %d answers, %d types from %d training questions",
                                         len(vocab), len(answers), len(types), len(asked))
        return dataclasses.replace(cfg, vocab=vocab, answers=answers, types=types)

    def prepare(self, batch: dict[str, Any], cfg: VQAConfig, targets: bool = True) -> dict[str, np.ndarray]:
        """-> frames uint8 (B, T', 3, H, W) (every `cfg.frame_stride`-th frame), logmel float (B, M, N)
        and, with `targets`, questions int64 (B, MAX_QUESTIONS, QUESTION_IDS), answers int64 (B,
        MAX_QUESTIONS) (NO_ANSWER in empty slots, UNKNOWN_ANSWER outside the vocabulary) and qtypes
        int64 (B, MAX_QUESTIONS) (index into cfg.types, -1: empty or unknown)."""
        b = decode_clip_batch(batch, frames=slice(None, None, cfg.frame_stride))
        out = {"frames": channels_first(b["frames"]), "logmel": np.ascontiguousarray(b["logmel"])}
        if targets:
            B = len(batch["video_id"])
            questions = np.full((B, MAX_QUESTIONS, QUESTION_IDS), PAD, np.int64)
            answers = np.full((B, MAX_QUESTIONS), NO_ANSWER, np.int64)
            qtypes = np.full((B, MAX_QUESTIONS), -1, np.int64)
            aidx, tidx = _index(cfg.answers), _index(cfg.types)
            for i, qs in enumerate(batch_questions(batch)):
                for j, q in enumerate(qs):
                    ids = encode(q["question"], cfg.vocab, QUESTION_IDS)
                    questions[i, j, : len(ids)] = ids
                    answers[i, j] = aidx.get(q["answer"], UNKNOWN_ANSWER)
                    qtypes[i, j] = tidx.get(q["type"], -1)
            out.update(questions=questions, answers=answers, qtypes=qtypes)
        return out

    def step(self, model, batch, cfg, gen=None) -> dict[str, torch.Tensor]:
        out = model(batch["frames"], batch["logmel"], batch["questions"])
        return vqa_loss(out["logits"], batch["answers"])

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, torch.Tensor]], cfg) -> dict[str, float]:
        """Accuracy over every question, overall (`acc_<condition>`), per type (`acc_<condition>_<type>`)
        and the mean over the types that need the sound (`acc_<condition>_sound`), for the conditions
        av (both streams), no_audio, no_video and question_only (the language prior: the learned
        absent vectors for both). `majority*`: the accuracy of answering each type's most common
        answer in these questions (an upper bound of the majority baseline a held-out set allows)."""
        preds: dict[str, list[torch.Tensor]] = {c: [] for c in CONDITIONS}
        answers, qtypes = [], []
        for batch in batches:
            keep = batch["answers"] != NO_ANSWER  # (B, Q)
            if not bool(keep.any()):
                continue
            streams = {"av": (batch["frames"], batch["logmel"]), "no_audio": (batch["frames"], None),
                       "no_video": (None, batch["logmel"]), "question_only": (None, None)}
            for c, (frames, mel) in streams.items():
                preds[c].append(model(frames, mel, batch["questions"])["logits"].argmax(dim=-1)[keep].cpu())
            answers.append(batch["answers"][keep].cpu())
            qtypes.append(batch["qtypes"][keep].cpu())
        if not answers:
            return {"questions": 0.0}
        ans, typ = torch.cat(answers), torch.cat(qtypes)
        res: dict[str, float] = {"questions": float(len(ans))}
        majority_right = torch.zeros(len(ans), dtype=torch.bool)
        for k, t in enumerate(cfg.types):
            sel = typ == k
            if bool(sel.any()):
                top = Counter(ans[sel].tolist()).most_common(1)[0][0]
                majority_right[sel] = ans[sel] == top
                res[f"questions_{t}"] = float(sel.sum())
                res[f"majority_{t}"] = float(majority_right[sel].float().mean())
        res["majority"] = float(majority_right.float().mean())
        sound = [t for t in SOUND_TYPES if f"questions_{t}" in res]
        if sound:
            res["majority_sound"] = float(np.mean([res[f"majority_{t}"] for t in sound]))
        for c in CONDITIONS:
            right = torch.cat(preds[c]) == ans
            res[f"acc_{c}"] = float(right.float().mean())
            for k, t in enumerate(cfg.types):
                if f"questions_{t}" in res:
                    res[f"acc_{c}_{t}"] = float(right[typ == k].float().mean())
            if sound:
                res[f"acc_{c}_sound"] = float(np.mean([res[f"acc_{c}_{t}"] for t in sound]))
        return res

    def headline(self, metrics: dict[str, float]) -> str:
        if "acc_av" not in metrics:
            return f"too few clips to score ({int(metrics.get('questions', 0))})"
        if "acc_av_sound" in metrics:
            return (f"{metrics['acc_av_sound']:.0%} right on the sound questions with audio, "
                    f"{metrics['acc_no_audio_sound']:.0%} without; question only {metrics['acc_question_only']:.0%} "
                    f"(majority {metrics['majority']:.0%}); {int(metrics['questions'])} questions")
        return (f"{metrics['acc_av']:.0%} right, {metrics['acc_no_audio']:.0%} without audio; question only "
                f"{metrics['acc_question_only']:.0%} (majority {metrics['majority']:.0%}); "
                f"{int(metrics['questions'])} questions")

    @torch.no_grad()
    def figure(self, model, batch: dict[str, torch.Tensor], cfg, path: str, n: int = 4) -> None:
        """Per clip (n): its first frame with the attention of its first question, and each of its
        questions with the true answer and the answers with and without audio."""
        import matplotlib.pyplot as plt

        from models.text import decode

        frames, mel, qs = batch["frames"][:n], batch["logmel"][:n], batch["questions"][:n]
        out = model(frames, mel, qs)
        mute = model(frames, None, qs)["logits"].argmax(dim=-1)
        fig, axes = plt.subplots(len(frames), 1, figsize=(7, 3.4 * len(frames)), squeeze=False)
        T, (H, W) = frames.shape[1], frames.shape[-2:]
        for i, ax in enumerate(axes[:, 0]):
            ax.imshow(frames[i, 0].permute(1, 2, 0).cpu().numpy())
            att = out["attention"][i, 0, : out["attention"].shape[-1] // T]  # the first frame's cells
            side = int(round(att.numel() ** 0.5))
            if side * side == att.numel():
                ax.imshow(att.reshape(side, side).cpu().numpy(), cmap="jet", alpha=0.4, extent=(0, W, H, 0))
            lines = []
            for j in range(qs.shape[1]):
                a = int(batch["answers"][i, j])
                if a == NO_ANSWER:
                    continue
                truth = cfg.answers[a] if a >= 0 else "(unknown)"
                lines.append(f"{decode(qs[i, j], cfg.vocab)} {truth} | with audio: "
                             f"{cfg.answers[int(out['logits'][i, j].argmax())]}, without: {cfg.answers[int(mute[i, j])]}")
            ax.set_title("\n".join(lines), fontsize=6, loc="left")
            ax.axis("off")
        save_figure(fig, path)

    # -- serving ----------------------------------------------------------------------------

    def question_ids(self, question: str, cfg: VQAConfig) -> np.ndarray:
        """A question -> int64 (QUESTION_IDS,) ids; RequestError 422 naming unknown words."""
        words = tokenize(question)
        if not words:
            raise RequestError(422, "the question has no words")
        if len(words) > QUESTION_IDS - 2:
            raise RequestError(422, f"the question has {len(words)} words; at most {QUESTION_IDS - 2}")
        index = _index(tuple(cfg.vocab))
        unknown = sorted({w for w in words if w not in index})
        if unknown:
            raise RequestError(422, f"unknown word(s) in the question: {', '.join(unknown)} (the model knows "
                                    f"{len(cfg.vocab) - 4} words, listed in its config at /v1/models)")
        ids = np.full(QUESTION_IDS, PAD, np.int64)
        enc = encode(question, cfg.vocab, QUESTION_IDS)
        ids[: len(enc)] = enc
        return ids

    def request(self, rows, cfg, settings: ClipSettings, options):
        """Item: frames uint8 (C, T', 3, H, W), logmel (C, M, N) or None (no sound), question
        int64 (QUESTION_IDS,). Meta: audio_used, the answer vocabulary."""
        ids = self.question_ids(str(options["question"]), cfg)
        x = self.prepare(rows, cfg, targets=False)
        heard = bool(rows["has_audio"].all()) and bool(options["sound"])
        return ({"frames": x["frames"], "logmel": x["logmel"] if heard else None, "question": ids},
                {"audio_used": heard, "answers": list(cfg.answers)})

    @torch.no_grad()
    def infer(self, model, items, device):
        """Result per item: float32 (C, A), each clip's answer probabilities. Items with and without
        sound run as two batches, `max_rows` clips at a time."""
        results: list[np.ndarray | None] = [None] * len(items)
        for silent in (False, True):
            idx = [i for i, it in enumerate(items) if (it["logmel"] is None) == silent]
            if not idx:
                continue
            frames = torch.cat([torch.from_numpy(items[i]["frames"]) for i in idx])  # uint8 (n, T', 3, H, W)
            mel = None if silent else torch.cat([torch.from_numpy(items[i]["logmel"]) for i in idx])  # (n, M, N)
            qs = torch.cat([torch.from_numpy(items[i]["question"])[None].expand(len(items[i]["frames"]), -1)
                            for i in idx])[:, None]  # (n, 1, L)

            def run(f: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
                x = to_model({"frames": f.to(device), "questions": q.to(device),
                              **({} if m is None else {"logmel": m.to(device)})})
                return model(x["frames"], x.get("logmel"), x["questions"])["logits"][:, 0].float().softmax(-1).cpu()

            probs = chunked(run, self.max_rows, frames, mel, qs).numpy()  # (n, A)
            for i, clips in zip(idx, per_item(probs, (len(items[i]["frames"]) for i in idx))):
                results[i] = clips
        return results

    def answer(self, result, meta, options) -> Answer:
        answers = meta["answers"]
        mean = result.mean(axis=0)  # (A,): the clips' distributions averaged
        top = np.argsort(-mean, kind="stable")[:5]
        span = meta["frames_per_clip"] / meta["fps"]
        return Answer({
            "question": options["question"], "answer": answers[int(top[0])], "probability": round(float(mean[top[0]]), 4),
            "top5": [{"answer": answers[int(k)], "probability": round(float(mean[k]), 4)} for k in top],
            "audio_used": meta["audio_used"],
            "clips": [{"start_s": s, "end_s": s + span, "answer": answers[int(p.argmax())],
                       "probability": round(float(p.max()), 4)} for s, p in zip(meta["starts"], result)]})


TASK = QuestionAnswering()
