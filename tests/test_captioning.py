"""Captioning (Show, Attend and Tell with audio): vocabulary, shapes, decoding, loss, metrics,
checkpoint round trip and a tiny training run whose verb only the audio can tell."""
import math
from dataclasses import replace

import pytest
import torch

from models.caption_metrics import bleu4, cider, first_object, sounding_object_accuracy
from models.captioning import PRESETS, Captioner, CaptioningConfig, caption_loss
from models.text import BOS, EOS, PAD, SPECIALS, UNK, build_vocab, decode, encode, encode_batch, tokenize
from jobs.tasks import get, load_checkpoint
from models.checkpoint import save_checkpoint
from pipelines.synth import caption
from pipelines.synth_audio import SOUND_TABLE

B, T, H, W, M, N, L = 3, 3, 67, 67, 64, 37, 7
WORDS = SPECIALS + tuple("abcdefghij")


def preset(name: str, vocab: tuple[str, ...]) -> CaptioningConfig:
    return replace(PRESETS[name], vocab=vocab)


def _inputs(seed: int = 0, b: int = B):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, T, 3, H, W, generator=g), torch.randn(b, M, N, generator=g) - 5,
            torch.randint(4, len(WORDS), (b, L), generator=g))


def _rows(ids: torch.Tensor) -> list[list[int]]:
    """Greedy output (B, L') -> id lists up to and including the first EOS."""
    out = []
    for row in ids.tolist():
        out.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return out


# --- vocabulary --------------------------------------------------------------------------------

def test_vocab_encode_decode_round_trip_and_unknown_words():
    caps = ["A red circle on the left hums.", "a blue square, on the right, is silent!", "a red square clicks"]
    vocab = build_vocab(caps)
    assert vocab[:4] == SPECIALS and (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    assert vocab[4:7] == ("a", "on", "red")  # by count (3, 2, 2), then alphabetically
    assert len(vocab) == len(set(vocab)) and build_vocab(reversed(caps)) == vocab
    assert build_vocab(caps, min_count=2) == SPECIALS + ("a", "on", "red", "square", "the")
    assert tokenize("  The  LEFT, hums. ") == ["the", "left", "hums"]
    ids = encode(caps[0], vocab, max_len=20)
    assert ids[0] == BOS and ids[-1] == EOS and len(ids) == 9
    assert decode(ids, vocab) == "a red circle on the left hums"
    assert decode(torch.tensor(ids + [PAD, PAD]), vocab) == decode(ids, vocab)
    unk = encode("a purple circle hums", vocab, max_len=20)
    assert unk[2] == UNK and decode(unk, vocab) == "a circle hums"
    assert encode(caps[0], vocab, max_len=4) == [BOS, vocab.index("a"), vocab.index("red"), EOS]
    batch = encode_batch(caps, vocab, max_len=20)
    assert batch.shape == (3, 10) and batch.dtype == torch.long and batch[2, -1] == PAD
    with pytest.raises(ValueError):
        CaptioningConfig(vocab=("a", "b"))


# --- model contract ----------------------------------------------------------------------------

def test_tiny_shapes_forward_backward_attention():
    torch.manual_seed(0)
    model = Captioner(preset("tiny", WORDS)).train()
    frames, logmel, caps = _inputs()
    out = model(frames, logmel, caps)
    assert model.cfg.frame_stride == 8
    cells = 1 * 9 * 9  # tiny: every 8th frame (frame 0 of T = 3); visual stride 8, 67 px -> 9 x 9 cells per frame
    assert out["logits"].shape == (B, L, len(WORDS)) and out["alphas"].shape == (B, L, cells)
    torch.testing.assert_close(out["alphas"].sum(-1), torch.ones(B, L))
    assert (out["alphas"] >= 0).all()
    losses = caption_loss(out, caps, model.cfg)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if name != "no_audio":  # it only gets gradient from samples hit by audio_dropout
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    single = model.eval()(frames[:, 0], logmel, caps)  # (B, 3, H, W): an image is T = 1
    assert single["alphas"].shape == (B, L, 81)


def test_task_step_decodes_only_up_to_the_longest_caption_of_fixed_width_tokens():
    """The captioning task's prepare pads tokens to a fixed width (rows of any Ray Data task stack
    into a batch); its step trims the trailing all-<pad> columns, so the decoder runs no extra steps."""

    torch.manual_seed(0)
    model = Captioner(preset("tiny", WORDS)).eval()  # eval: no dropout, the same loss twice
    frames, logmel, caps = _inputs()
    caps[:, -2:] = PAD  # the longest caption is L - 2 ids
    task = get("captioning")
    steps: list[int] = []
    forward = model.forward
    model.forward = lambda f, m, c: steps.append(c.shape[1]) or forward(f, m, c)
    fixed = torch.cat([caps, torch.full((B, 5), PAD)], dim=1)  # (B, max_len), as prepare gives it
    got = task.step(model, {"frames": frames, "logmel": logmel, "tokens": fixed}, model.cfg)
    ref = caption_loss(forward(frames, logmel, caps[:, : L - 3]), caps[:, 1 : L - 2], model.cfg)
    assert steps == [L - 3] and torch.equal(got["loss"], ref["loss"])


def test_frame_stride_attends_to_every_kth_frame():
    torch.manual_seed(4)
    cfg = CaptioningConfig(vocab=WORDS, frame_stride=2)
    model = Captioner(cfg).eval()
    every = Captioner(CaptioningConfig(vocab=WORDS)).eval()
    every.load_state_dict(model.state_dict())
    frames = torch.rand(2, 5, 3, 16, 16)
    logmel, caps = torch.randn(2, M, N), torch.randint(4, len(WORDS), (2, 4))
    with torch.no_grad():
        out = model(frames, logmel, caps)
        ref = every(frames[:, [0, 2, 4]], logmel, caps)
    assert out["alphas"].shape == (2, 4, 3 * 2 * 2)  # frames 0, 2, 4; 16 px -> 2 x 2 cells
    torch.testing.assert_close(out["logits"], ref["logits"])
    with pytest.raises(ValueError):
        CaptioningConfig(vocab=WORDS, frame_stride=0)


def test_tiny_preset_parameter_count():
    n = sum(p.numel() for p in Captioner(preset("tiny", WORDS)).parameters())
    assert n == 389_932 + 129 * len(WORDS)


def test_paper_preset_builds_and_runs():
    cfg = preset("paper", WORDS)
    model = Captioner(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    assert n == 27_848_466
    assert sum(p.numel() for p in Captioner(preset("paper", WORDS + ("k",))).parameters()) - n == 2 * 512 + 1
    assert cfg.visual.arch == "resnet18" and cfg.image_size == 224 and cfg.hidden_dim == 1024
    assert set(PRESETS) == {"tiny", "paper"}
    with torch.no_grad():
        out = model(torch.rand(1, 1, 3, 224, 224), torch.randn(1, M, 96), torch.tensor([[BOS, 4, 5]]))
    assert out["logits"].shape == (1, 3, len(WORDS)) and out["alphas"].shape == (1, 3, 49)
    assert torch.isfinite(out["logits"]).all()


def test_batch_consistency_eval_forward():
    torch.manual_seed(1)
    model = Captioner(preset("tiny", WORDS)).eval()
    frames, logmel, caps = _inputs(1)
    with torch.no_grad():
        batched = model(frames, logmel, caps)
        singles = [model(frames[i:i + 1], logmel[i:i + 1], caps[i:i + 1]) for i in range(B)]
    for key in ("logits", "alphas"):
        torch.testing.assert_close(batched[key], torch.cat([s[key] for s in singles]), atol=1e-5, rtol=1e-4)


def test_no_audio_path_runs_and_differs():
    torch.manual_seed(2)
    model = Captioner(preset("tiny", WORDS)).eval()
    frames, logmel, caps = _inputs(2)
    with torch.no_grad():
        with_audio = model(frames, logmel, caps)["logits"]
        without = model(frames, None, caps)["logits"]
    assert torch.isfinite(without).all() and not torch.allclose(with_audio, without)
    assert model.greedy(frames, None, max_len=5).shape[0] == B
    silent = Captioner(CaptioningConfig(vocab=WORDS, use_audio=False)).eval()
    assert not any(k.startswith("audio") for k in silent.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(silent(frames, logmel, caps)["logits"], silent(frames, None, caps)["logits"])


def test_beam_search_random_model_hits_max_len():
    torch.manual_seed(3)
    model = Captioner(preset("tiny", WORDS)).eval()
    with torch.no_grad():
        model.out.bias[EOS] = -1e4  # never ends: every hypothesis is cut at max_len
    frames, logmel, _ = _inputs(3)
    greedy = model.greedy(frames, logmel, max_len=6)
    assert greedy.shape == (B, 6) and not (greedy == EOS).any() and not (greedy <= BOS).any()
    assert model.beam_search(frames, logmel, beam_size=1, max_len=6) == greedy.tolist()
    beams = model.beam_search(frames, logmel, beam_size=3, max_len=6)
    assert [len(b) for b in beams] == [6] * B
    with pytest.raises(ValueError):
        model.beam_search(frames, logmel, beam_size=0)


def test_caption_loss_ignores_pads():
    torch.manual_seed(4)
    V = len(WORDS)
    targets = torch.tensor([[5, 6, EOS, PAD, PAD], [7, 8, 9, 10, EOS]])
    out = {"logits": torch.randn(2, 5, V), "alphas": torch.softmax(torch.randn(2, 5, 11), dim=-1)}
    cfg = CaptioningConfig(vocab=WORDS, doubly_stochastic=0.5)
    ref = caption_loss(out, targets, cfg)
    changed = {k: v.clone() for k, v in out.items()}
    changed["logits"][0, 3:] = 100 * torch.randn(2, V)
    changed["alphas"][0, 3:] = torch.softmax(10 * torch.randn(2, 11), dim=-1)
    got = caption_loss(changed, targets, cfg)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    mask = (targets != PAD).float()
    cover = torch.einsum("blp,bl->bp", out["alphas"], mask)
    torch.testing.assert_close(ref["attention_reg"], ((1 - cover) ** 2).sum(-1).mean())
    xent = torch.nn.functional.cross_entropy(out["logits"][mask.bool()], targets[mask.bool()])
    torch.testing.assert_close(ref["xent"], xent)
    torch.testing.assert_close(ref["loss"], xent + 0.5 * ref["attention_reg"])


# --- metrics -----------------------------------------------------------------------------------

def test_bleu4_against_hand_computed_values():
    assert bleu4(["a red circle on the left hums"], [["a red circle on the left hums"]]) == pytest.approx(1.0)
    # Clipped n-gram precisions 5/6, 4/5, 3/4, 2/3 (best matches in the second reference), same
    # length as a reference (no brevity penalty): BLEU = (1/3) ** (1/4).
    got = bleu4(["the cat is on the mat"], [["there is a cat on the mat", "a cat is on the mat"]])
    assert got == pytest.approx(3 ** -0.25, abs=1e-4)
    # Every n-gram matches but 4 words against 7: brevity penalty exp(1 - 7/4).
    got = bleu4(["A red circle on."], [["a red circle on the left hums"]])
    assert got == pytest.approx(math.exp(-0.75), abs=1e-4)


def test_cider_against_hand_computed_values():
    # 2 images: idf = log 2 for every reference n-gram. Image 1 matches exactly: cosine 1 for the
    # 1- and 2-grams, 0 for 3- and 4-grams (none) -> mean 0.5, x 10 = 5. Image 2 shares nothing: 0.
    assert cider(["a b", "c d"], [["a b"], ["e f"]]) == pytest.approx(2.5)
    refs = [["a red circle on the left hums"], ["a blue square on the right clicks"]]
    same = cider(["a red circle on the left hums", "a blue square on the right clicks"], refs)
    other = cider(["a blue circle on the right hums", "a red square on the left clicks"], refs)
    assert same > other > 0


def _obj(i: int, shape: str, colour: str, striped: bool, x: float, seconds: float) -> dict:
    return {"id": i, "shape": shape, "colour": colour, "texture": "striped" if striped else "solid",
            "sound": SOUND_TABLE[(shape, colour)], "boxes": [[x - 10, 40, x + 10, 60]] * 4,
            "sounding": [seconds > 0] * 4, "segments": [[0.0, seconds]] if seconds > 0 else []}


def test_first_object_on_synth_grammar():
    two = caption([_obj(0, "square", "blue", False, 200, 0.0), _obj(1, "circle", "red", False, 30, 2.0)], 256)
    one = caption([_obj(0, "triangle", "green", True, 128, 1.5)], 256)
    three = caption([_obj(0, "circle", "yellow", True, 30, 1.0), _obj(1, "triangle", "red", False, 128, 3.0),
                     _obj(2, "square", "green", False, 220, 0.5)], 256)
    assert two.startswith("a red circle on the left ") and " while a blue square on the right is silent" in two
    assert first_object(two) == ("red", "circle")
    assert one.startswith("a striped green triangle in the centre ") and first_object(one) == ("green", "triangle")
    assert first_object(three) == ("red", "triangle")
    assert first_object("") is None and first_object("the red circle") is None and first_object("a striped") is None
    hyps = ["a red circle on the right hums", "a blue square on the right is silent", "a triangle", "a green triangle"]
    assert sounding_object_accuracy(hyps, [two, two, one, one]) == 0.5
    with pytest.raises(ValueError):
        sounding_object_accuracy(["a red circle"], ["nothing"])


# --- training ----------------------------------------------------------------------------------

COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.35, 0.95)}
PLACES = ("on the left", "in the centre", "on the right")
VERBS = ("hums", "clicks")
TOY_SIZE, TOY_T, TOY_M, TOY_N = 32, 2, 16, 8


def _toy(n: int, g: torch.Generator):
    """One 10 px square per clip (colour and third of the frame visible); the verb is told only by
    a tone band in the log-mel: low mel bins for "hums", high ones for "clicks"."""
    colour, place, verb = (torch.randint(0, k, (n,), generator=g) for k in (3, 3, 2))
    frames = 0.1 * torch.rand(n, TOY_T, 3, TOY_SIZE, TOY_SIZE, generator=g)
    ys = torch.randint(2, TOY_SIZE - 12, (n, TOY_T), generator=g)
    jitter = torch.randint(-1, 2, (n, TOY_T), generator=g)
    logmel = 0.5 * torch.randn(n, TOY_M, TOY_N, generator=g)
    caps = []
    for i in range(n):
        name = list(COLOURS)[colour[i]]
        for t in range(TOY_T):
            x0 = min(max(1 + 11 * int(place[i]) + int(jitter[i, t]), 0), TOY_SIZE - 10)
            frames[i, t, :, ys[i, t]:ys[i, t] + 10, x0:x0 + 10] = torch.tensor(COLOURS[name])[:, None, None]
        band = 2 if verb[i] == 0 else 10
        logmel[i, band:band + 3] += 3.0
        caps.append(f"a {name} square {PLACES[place[i]]} {VERBS[verb[i]]}")
    return frames, logmel, caps


@pytest.fixture(scope="module")
def trained():
    vocab = build_vocab(f"a {c} square {p} {v}" for c in COLOURS for p in PLACES for v in VERBS)
    cfg = preset("tiny", vocab)
    torch.manual_seed(0)
    model = Captioner(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(150):
        frames, logmel, caps = _toy(32, g)
        ids = encode_batch(caps, vocab, cfg.max_len)
        loss = caption_loss(model(frames, logmel, ids[:, :-1]), ids[:, 1:], cfg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses, _toy(90, torch.Generator().manual_seed(123))


def test_training_learns_what_it_sees_and_what_it_hears(trained):
    model, losses, (frames, logmel, caps) = trained
    assert sum(losses[-10:]) / 10 < 0.3 * losses[0]
    vocab = model.cfg.vocab
    for audio, verb_ok in ((logmel, lambda acc: acc >= 0.8), (None, lambda acc: acc <= 0.7)):
        hyps = [decode(r, vocab) for r in model.greedy(frames, audio)]
        seen = sum(h.split()[:-1] == r.split()[:-1] for h, r in zip(hyps, caps)) / len(caps)
        heard = sum(h.split()[-1:] == r.split()[-1:] for h, r in zip(hyps, caps)) / len(caps)
        assert seen >= 0.8, (audio is None, seen, hyps[:3])
        assert verb_ok(heard), (audio is None, heard, hyps[:3])
    assert bleu4(hyps, [[c] for c in caps]) > 0.5


def test_trained_greedy_batch_consistency_and_beam(trained):
    model, _, (frames, logmel, _) = trained
    frames, logmel = frames[:5], logmel[:5]
    batched = _rows(model.greedy(frames, logmel))
    assert batched == [_rows(model.greedy(frames[i:i + 1], logmel[i:i + 1]))[0] for i in range(5)]
    assert all(r[-1] == EOS for r in batched)
    assert model.beam_search(frames, logmel, beam_size=1) == batched
    beams = model.beam_search(frames, logmel, beam_size=3)
    assert len(beams) == 5 and all(b[-1] == EOS for b in beams)


def test_checkpoint_round_trip(trained, tmp_path):
    model, _, (frames, logmel, _) = trained
    path = save_checkpoint(tmp_path / "cap.pt", "captioning", model, model.cfg, extra={"step": 150})
    loaded, ckpt = load_checkpoint(path, task="captioning")
    assert isinstance(loaded, Captioner) and loaded.cfg == model.cfg
    assert loaded.cfg.vocab == model.cfg.vocab and isinstance(loaded.cfg.vocab, tuple)
    assert ckpt["config"]["vocab"] == model.cfg.vocab and ckpt["extra"]["step"] == 150
    assert torch.equal(loaded.greedy(frames[:8], logmel[:8]), model.greedy(frames[:8], logmel[:8]))
