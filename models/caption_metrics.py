"""Caption metrics: corpus BLEU-4 (torchmetrics), CIDEr (pycocoevalcap's scorer) and, for the
synthetic scenes, whether the caption names the right sounding object first.

All metrics normalise text with `models.text.tokenize` (lower-case, whitespace split,
punctuation stripped) and compare the space-joined tokens; pycocoevalcap's PTBTokenizer is not
used (it needs Java). pycocoevalcap is imported lazily: only `cider` needs it.
"""

from __future__ import annotations

from typing import Sequence

from torchmetrics.functional.text import bleu_score

from models.text import tokenize


def _norm(text: str) -> str:
    return " ".join(tokenize(text))


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if any(isinstance(r, str) or len(r) == 0 for r in references):
        raise ValueError("each entry of references must be a non-empty list of strings")


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al.: clipped 1..4-gram precisions pooled over the corpus,
    uniform geometric mean, brevity penalty against the closest reference length; no smoothing)
    with `torchmetrics.functional.text.bleu_score`. hypotheses: one string per sample;
    references: one or more strings per sample. Returns a float in [0, 1] (0.0 for no samples)."""
    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    preds = [_norm(h) for h in hypotheses]
    target = [[_norm(r) for r in refs] for refs in references]
    return float(bleu_score(preds, target, n_gram=4))


def cider(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr (Vedantam et al. 2015) with pycocoevalcap's `Cider` scorer (n = 4, sigma = 6:
    tf-idf n-gram cosine similarity with clipping and a length penalty, x 10, averaged over the
    samples). The idf comes from the references of THIS corpus, so scores depend on the corpus and
    a single-sample corpus always scores 0 (every n-gram has idf log(1/1)). Returns a float >= 0."""
    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("cider() needs pycocoevalcap: pip install pycocoevalcap") from e
    gts = {i: [_norm(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [_norm(h)] for i, h in enumerate(hypotheses)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def first_object(caption: str) -> tuple[str, str] | None:
    """(colour, shape) named by the first clause of a synth caption "a [striped] <colour> <shape> ...",
    e.g. "a striped green triangle in the centre clicks" -> ("green", "triangle"); None if the
    caption does not start that way (the grammar is in `pipelines.synth`)."""
    words = tokenize(caption)
    if len(words) > 1 and words[1] == "striped":
        words = words[:1] + words[2:]
    if len(words) < 3 or words[0] != "a":
        return None
    return words[1], words[2]


def sounding_object_accuracy(hypotheses: list[str], references: list[str]) -> float:
    """Fraction of hypotheses whose `first_object` (the object sounding longest, in the synth
    grammar) equals the reference's; an unparseable hypothesis counts as wrong. references: one
    synth caption per sample (ValueError if one does not parse). 0.0 for no samples."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    hits = 0
    for hyp, ref in zip(hypotheses, references):
        want = first_object(ref)
        if want is None:
            raise ValueError(f"reference is not a synth caption: {ref!r}")
        hits += first_object(hyp) == want
    return hits / len(hypotheses)
