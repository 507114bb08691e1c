"""Joint embedding: shapes and unit norms, symmetric InfoNCE against a hand computation, the
learned temperature, retrieval metrics on constructed similarity matrices, and a tiny training
run in which matched pairs come to outrank shuffled ones."""
import itertools
import math

import pytest
import torch

from models.retrieval import (MAX_LOGIT_SCALE, PRESETS, JointEmbedder, RetrievalConfig, TemporalPool, fuse,
                              info_nce, retrieval_loss)
from models.retrieval_metrics import ranks, retrieval_scores
from models.text import SPECIALS, encode_batch, skipgram_vectors

B, T, H, W, M, N = 3, 5, 37, 37, 64, 41
WORDS = SPECIALS + ("red", "blue", "circle", "square", "hums", "clicks")


def _inputs(b: int = B, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(b, T, 3, H, W, generator=g)
    logmel = torch.randn(b, M, N, generator=g)
    tokens = encode_batch(["red circle hums", "blue square", "red square clicks clicks"][:b], WORDS, 24)
    return frames, logmel, tokens


def test_forward_shapes_unit_norms_and_backward():
    torch.manual_seed(0)
    cfg = RetrievalConfig(vocab=WORDS)
    model = JointEmbedder(cfg)
    out = model(*_inputs())
    for k in ("video", "audio", "text"):
        assert out[k].shape == (B, 64) and torch.allclose(out[k].norm(dim=1), torch.ones(B), atol=1e-5), k
    assert fuse(out["video"], out["audio"]).norm(dim=1).allclose(torch.ones(B), atol=1e-5)
    assert out["logit_scale"].item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    losses = retrieval_loss(out, cfg)
    assert set(losses) == {"loss", "video_text", "audio_text", "video_audio", "temperature"}
    losses["loss"].backward()
    assert model.logit_scale.grad is not None and torch.isfinite(model.logit_scale.grad)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and n != "pos_embed.weight")


def test_video_uses_every_kth_frame_and_text_ignores_padding():
    torch.manual_seed(1)
    model = JointEmbedder(RetrievalConfig(vocab=WORDS, frame_stride=2)).eval()
    frames, logmel, tokens = _inputs()
    changed = frames.clone()
    changed[:, 1::2] = 0.0  # frames the stride skips
    with torch.no_grad():
        assert torch.equal(model.encode_video(frames), model.encode_video(changed))
        padded = torch.cat([tokens, torch.zeros(B, 4, dtype=torch.long)], dim=1)
        torch.testing.assert_close(model.encode_text(padded), model.encode_text(tokens), atol=1e-6, rtol=0)
        # batch consistency: batched rows equal single calls
        single = torch.cat([model.encode_audio(logmel[i:i + 1]) for i in range(B)])
        torch.testing.assert_close(model.encode_audio(logmel), single, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="exceed max_frames"):
        model.encode_video(torch.rand(1, 40, 3, H, W))


def test_temporal_pool_is_a_softmax_weighted_mean_per_query_and_keeps_time_order():
    torch.manual_seed(2)
    pool = TemporalPool(dim=4, max_steps=6, queries=3)
    x = torch.randn(2, 5, 4)
    out = pool(x)
    assert out.shape == (2, 3 * 4)
    xt = x + pool.time_embed.weight[:5]  # by hand: query k's softmax over the 5 steps
    w = torch.softmax(torch.einsum("btd,kd->bkt", xt, pool.queries) / 2.0, dim=-1)
    expected = torch.stack([torch.stack([(w[b, k, :, None] * xt[b]).sum(0) for k in range(3)]).flatten()
                            for b in range(2)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # the same features in another order pool to another vector: when things happen is kept
    assert not torch.allclose(pool(x.flip(1)), out, atol=1e-3)
    with pytest.raises(ValueError, match="7 time steps exceed 6"):
        pool(torch.randn(1, 7, 4))


def test_info_nce_equals_the_hand_computed_value_on_3x3():
    a = torch.eye(3)
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
    e = math.exp  # logits = a b^T = b^T: rows [1, 0, .6], [0, 1, .8], [0, 0, 0]; columns are b's rows
    rows = [-math.log(e(1) / (e(1) + 1 + e(0.6))), -math.log(e(1) / (1 + e(1) + e(0.8))), -math.log(1 / 3)]
    cols = [-math.log(e(1) / (e(1) + 2)), -math.log(e(1) / (e(1) + 2)), -math.log(1 / (e(0.6) + e(0.8) + 1))]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    assert info_nce(a, b, torch.tensor(0.0)).item() == pytest.approx(expected, rel=1e-6)
    # a larger scale sharpens the logits: the same pairs cost less once they are the best match
    assert info_nce(a, a, torch.tensor(math.log(10.0))) < info_nce(a, a, torch.tensor(0.0))


def test_info_nce_extra_negatives_count_in_the_a_to_b_direction_only():
    a = torch.eye(2)
    b = torch.eye(2)
    extra = torch.tensor([[1.0, 0.0]])  # a copy of b's first row: a negative of every row of a
    e = math.exp
    a_to_b = [-math.log(e(1) / (e(1) + 1 + e(1))), -math.log(e(1) / (1 + e(1) + 1))]
    b_to_a = [-math.log(e(1) / (e(1) + 1))] * 2
    expected = 0.5 * (sum(a_to_b) / 2 + sum(b_to_a) / 2)
    assert info_nce(a, b, torch.tensor(0.0), extra).item() == pytest.approx(expected, rel=1e-6)
    cfg = RetrievalConfig(vocab=WORDS, reversed_negatives=True, pair_weights=(0.0, 0.0, 1.0))
    torch.manual_seed(3)
    model = JointEmbedder(cfg).eval()  # eval: batch norm does not mix the reversed rows with the others
    frames, logmel, tokens = _inputs()
    out = model(frames, logmel, tokens, reversed_audio=True)
    assert out["audio_reversed"].shape == (B, 64)
    with torch.no_grad():
        torch.testing.assert_close(out["audio_reversed"], model.encode_audio(logmel.flip(-1)), atol=1e-5, rtol=0)
    loss = retrieval_loss(out, cfg)["loss"]
    plain = info_nce(out["video"], out["audio"], out["logit_scale"])
    assert loss.item() > plain.item()  # more negatives, a larger a -> b cross-entropy


def test_temperature_is_clamped_and_the_pair_weights_apply():
    cfg = RetrievalConfig(vocab=WORDS, pair_weights=(0.0, 0.0, 1.0))
    model = JointEmbedder(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    out = model(*_inputs())
    assert out["logit_scale"].item() == pytest.approx(MAX_LOGIT_SCALE)
    losses = retrieval_loss(out, cfg)
    assert torch.equal(losses["loss"], losses["video_audio"]) and losses["temperature"].item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="one >= 0 per pair"):
        RetrievalConfig(pair_weights=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="multiple of text_heads"):
        RetrievalConfig(text_dim=30, text_heads=4)
    assert PRESETS["paper"].visual.arch == "resnet18" and PRESETS["tiny"].embed_dim == 64


def test_ranks_and_recalls_on_a_constructed_matrix():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.4, 0.4, 0.4]])
    assert ranks(sim, torch.eye(3, dtype=torch.bool)).tolist() == [1.0, 2.0, 2.0]  # q2: two ties count half
    assert retrieval_scores(sim) == {"r1": 1 / 3, "r5": 1.0, "r10": 1.0, "median_rank": 2.0}
    # with the third item also correct for query 1 (an identical caption), it ranks first
    correct = torch.eye(3, dtype=torch.bool)
    correct[1, 2] = True
    assert ranks(sim, correct).tolist() == [1.0, 1.0, 2.0]
    constant = torch.zeros(5, 5)  # no information: the expected rank of a random order, (N + 1) / 2
    assert ranks(constant, torch.eye(5, dtype=torch.bool)).tolist() == [3.0] * 5
    with pytest.raises(ValueError, match="at least one correct item"):
        ranks(sim, torch.zeros(3, 3, dtype=torch.bool))


def test_tiny_training_matches_pairs_above_chance():
    """20 steps on 6 fixed random clips whose captions differ: matched video-audio pairs come to
    outrank the others (R@1 1.0 where chance is 1/6)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    frames, logmel = torch.rand(6, 4, 3, 24, 24, generator=g), torch.randn(6, M, 21, generator=g)
    words = ["red circle", "blue circle", "red square", "blue square", "hums", "clicks"]
    tokens = encode_batch(words, WORDS, 8)
    cfg = RetrievalConfig(vocab=WORDS, max_frames=4)
    model = JointEmbedder(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        loss = retrieval_loss(model(frames, logmel, tokens), cfg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(frames, logmel, tokens)
    assert retrieval_scores(out["audio"] @ out["video"].T)["r1"] == 1.0
    assert retrieval_scores(out["text"] @ out["video"].T)["r1"] == 1.0


def test_skipgram_vectors_place_words_of_the_same_contexts_together_and_initialise_the_text_encoder():
    # two families of captions: red/crimson things on the left/right hum or talk, blue/navy ones in
    # the centre/middle click or hiss
    captions = 10 * ([f"a {c} {s} on the {p} {v}" for c, s, p, v in itertools.product(
        ["red", "crimson"], ["circle", "triangle"], ["left", "right"], ["hums", "talks"])]
        + [f"a {c} {s} in the {p} {v}" for c, s, p, v in itertools.product(
            ["blue", "navy"], ["square", "star"], ["centre", "middle"], ["clicks", "hisses"])])
    vocab = SPECIALS + tuple(sorted({w for c in captions for w in c.split()})) + ("unseen",)
    vecs = skipgram_vectors(captions, vocab, 16, epochs=50)
    again = skipgram_vectors(captions, vocab, 16, epochs=50)
    assert vecs == again  # deterministic for a seed
    v = torch.tensor(vecs)
    assert v.shape == (len(vocab), 16)
    assert torch.count_nonzero(v[: len(SPECIALS)]) == 0 and torch.count_nonzero(v[-1]) == 0  # specials, unseen
    assert v[len(SPECIALS):-1].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)

    def cos(a: str, b: str) -> float:
        return torch.nn.functional.cosine_similarity(v[vocab.index(a)], v[vocab.index(b)], dim=0).item()

    # words said in the same contexts (substitutes) come out closer than words of the other captions
    assert cos("red", "crimson") > max(cos("red", "blue"), cos("red", "navy")) + 0.5
    assert cos("blue", "navy") > max(cos("blue", "red"), cos("blue", "crimson")) + 0.5

    torch.manual_seed(0)
    plain = JointEmbedder(RetrievalConfig(vocab=vocab, text_dim=16, text_heads=4)).word_embed.weight
    torch.manual_seed(0)
    model = JointEmbedder(RetrievalConfig(vocab=vocab, text_dim=16, text_heads=4, word_vectors=vecs))
    w = model.word_embed.weight.detach()
    torch.testing.assert_close(w[len(SPECIALS):-1], v[len(SPECIALS):-1].float())
    torch.testing.assert_close(w[-1], plain[-1].detach())  # no vector: the random initialisation
    assert torch.count_nonzero(w[0]) == 0  # <pad> stays zero
    with pytest.raises(ValueError, match="word_vectors: one row of text_dim=16 per word of the 25-word vocab, got 3 rows"):
        RetrievalConfig(vocab=vocab, text_dim=16, text_heads=4, word_vectors=vecs[:3])


def test_the_word2vec_preset_fits_vectors_with_its_vocabulary():
    from jobs.tasks import get

    task = get("retrieval")
    captions = ["a red circle on the left hums", "a blue square on the right clicks"] * 20
    read = lambda cols: {"video_id": [f"v{i}" for i in range(len(captions))], "caption": captions}  # noqa: E731
    plain = task.fit(PRESETS["tiny"], read)
    fitted = task.fit(PRESETS["tiny-word2vec"], read)
    assert plain.word_vectors == () and fitted.vocab == plain.vocab and len(fitted.vocab) == len(SPECIALS) + 11
    assert len(fitted.word_vectors) == len(fitted.vocab) and {len(v) for v in fitted.word_vectors} == {64}
    assert JointEmbedder(fitted).word_embed.weight.shape == (len(SPECIALS) + 11, 64)
