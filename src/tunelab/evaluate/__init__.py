"""Evaluation: perplexity with training's masking, BLEU / chrF / ROUGE-L / exact match, and `tunelab eval`.

    from tunelab.evaluate import evaluate_records
    result = evaluate_records(model, tokenizer, records, ["perplexity", "bleu", "rouge"])
    print(result.metrics)   # {"perplexity": ..., "eval_loss": ..., "eval_tokens": ..., "bleu": ..., "rouge_l": ...}

torch and transformers are imported inside the functions, so importing this package is cheap.
"""

from tunelab.evaluate.metrics import TextScores, choose_tokenize, normalize_answer, score_texts
from tunelab.evaluate.runner import (EvalError, EvalResult, EvalRun, evaluate_records, load_eval_data,
                                     normalize_metrics, run_eval)

__all__ = ["EvalError", "EvalResult", "EvalRun", "TextScores", "choose_tokenize", "evaluate_records",
           "load_eval_data", "normalize_answer", "normalize_metrics", "run_eval", "score_texts"]
