"""Text metrics for generated answers: BLEU and chrF (sacrebleu), ROUGE-L (rouge-score), exact match.

Every score is on a 0-100 scale. Unsegmented scripts are scored correctly:

- BLEU: sacrebleu's ``zh`` tokeniser (each Han character is a token, the rest as ``13a``) when the references
  hold Chinese characters; ``char`` (every character a token) for Japanese kana and Thai/Lao/Khmer/Myanmar text,
  which have no spaces and are not covered by ``zh``; otherwise the standard ``13a``. The choice and the reason
  are returned with the scores and written into every report.
- ROUGE-L: rouge-score's default tokeniser keeps only ``[a-z0-9]`` and so scores any Chinese answer 0; we pass
  a tokeniser that makes each character of an unsegmented script its own token and keeps Unicode words whole.
- chrF works on characters already; whitespace is ignored (sacrebleu's default).
- Exact match compares after NFKC, case folding, dropping punctuation and collapsing whitespace.

    scores = score_texts(["北京是中国的首都。"], ["中国的首都是北京。"], ["bleu", "rouge", "chrf"])
    scores.corpus["bleu"], scores.per_sample[0]["rouge_l"], scores.tokenize
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

GENERATION_METRICS = ("bleu", "chrf", "rouge", "exact_match")
ALL_METRICS = ("perplexity",) + GENERATION_METRICS

# Han ideographs (BMP blocks, compatibility ideographs, extension B+), i.e. what sacrebleu's `zh` splits.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
# Scripts written without spaces that `zh` does not split: kana, Thai, Lao, Myanmar, Khmer.
_OTHER_UNSEGMENTED = "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"
_HAN_RE = re.compile(f"[{_HAN}]")
_OTHER_RE = re.compile(f"[{_OTHER_UNSEGMENTED}]")
_TOKEN_RE = re.compile(f"[{_HAN}{_OTHER_UNSEGMENTED}]|[^\\W_]+")
_SPACE_BETWEEN_CHARS_RE = re.compile(f"(?<=[{_HAN}{_OTHER_UNSEGMENTED}])\\s+(?=[{_HAN}{_OTHER_UNSEGMENTED}])")


@dataclass
class TextScores:
    corpus: dict[str, float]  # bleu, chrf, rouge_l, exact_match (those asked for)
    per_sample: list[dict[str, float]]
    tokenize: str  # sacrebleu tokeniser used for BLEU: zh | char | 13a
    tokenize_reason: str
    rouge_tokenizer: str = "unicode words; one token per character of unsegmented scripts (Han, kana, Thai, ...)"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, str]:
        return {"bleu_tokenize": self.tokenize, "bleu_tokenize_reason": self.tokenize_reason,
                "rouge_tokenizer": self.rouge_tokenizer, "chrf": "sacrebleu chrF (char 6-grams, beta=2)",
                "exact_match": "NFKC, case-folded, punctuation removed, whitespace collapsed", "scale": "0-100"}


def choose_tokenize(references: Sequence[str]) -> tuple[str, str]:
    """The sacrebleu tokeniser for these references, and why."""
    text = "".join(references)
    letters = sum(1 for c in text if c.isalnum()) or 1
    other = len(_OTHER_RE.findall(text))
    han = len(_HAN_RE.findall(text))
    if other / letters >= 0.01:
        return "char", (f"{other / letters:.0%} of the reference characters are kana/Thai/Khmer-like script "
                        "written without spaces: every character is a token")
    if han:
        return "zh", (f"references contain Chinese characters ({han / letters:.0%} of letters): each Han character "
                      "is a token, other text tokenised as 13a")
    return "13a", "references are space-separated text: standard 13a (mteval) tokenisation"


class UnicodeRougeTokenizer:
    """rouge-score tokeniser: lower-cased Unicode words; each Han/kana/Thai... character is a token."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).casefold())


def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    text = " ".join(text.split())
    return _SPACE_BETWEEN_CHARS_RE.sub("", text)


def score_texts(predictions: Sequence[str], references: Sequence[str],
                metrics: Sequence[str] = GENERATION_METRICS) -> TextScores:
    """Corpus-level and per-sample scores (0-100) of `predictions` against one reference each."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    preds, refs = [p or "" for p in predictions], [r or "" for r in references]
    tokenize, reason = choose_tokenize(refs)
    corpus: dict[str, float] = {}
    per_sample: list[dict[str, float]] = [{} for _ in preds]
    if not preds:
        return TextScores(corpus, per_sample, tokenize, reason, notes=["no samples to score"])
    if "bleu" in metrics:
        corpus["bleu"] = sacrebleu.corpus_bleu(preds, [refs], tokenize=tokenize).score
        sentence = sacrebleu.metrics.BLEU(tokenize=tokenize, effective_order=True)
        for s, p, r in zip(per_sample, preds, refs):
            s["bleu"] = sentence.sentence_score(p, [r]).score
    if "chrf" in metrics:
        corpus["chrf"] = sacrebleu.corpus_chrf(preds, [refs]).score
        chrf = sacrebleu.metrics.CHRF()
        for s, p, r in zip(per_sample, preds, refs):
            s["chrf"] = chrf.sentence_score(p, [r]).score
    if "rouge" in metrics or "rouge_l" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeRougeTokenizer())
        for s, p, r in zip(per_sample, preds, refs):
            s["rouge_l"] = 100.0 * scorer.score(r, p)["rougeL"].fmeasure
        corpus["rouge_l"] = sum(s["rouge_l"] for s in per_sample) / len(per_sample)
    if "exact_match" in metrics:
        for s, p, r in zip(per_sample, preds, refs):
            s["exact_match"] = 100.0 if normalize_answer(p) == normalize_answer(r) else 0.0
        corpus["exact_match"] = sum(s["exact_match"] for s in per_sample) / len(per_sample)
    return TextScores(corpus, per_sample, tokenize, reason)
