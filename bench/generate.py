"""Generation and evaluation speed: single stream (before, now, llama.cpp) and batches, in one process, side by side.

    python bench/generate.py --quick                 # 8 prompts x 32 new tokens; eval over 32 records
    python bench/generate.py --json bench-gen.json   # 16 prompts x 128 new tokens; eval over 200 records
    python bench/generate.py --skip-eval --prompts 6 --max-new-tokens 128   # the single-stream table only

Part 0, single stream (batch 1), prompt by prompt, the three engines taking turns on each prompt so that the
machine's load falls on all of them alike: (a) transformers' `generate` as `tunelab infer` called it before
(DynamicCache, the model's full forward per token), (b) `tunelab.infer.generate` now (the serve engine's loop
with tunelab.decode's preallocated KV cache and lean step, bf16 weights prepacked for oneDNN), (b') the same
with `weights="int8"` (opt-in: int8 copies of the weights, answers close to but not the model's own), (c) llama.cpp
through llama-cpp-python on the project's own GGUF export of the same model (`export_gguf(..., quant="q8_0")`,
the function behind `tunelab export --format gguf --quant q8_0`), greedy, same prompt tokens, same thread count.
Time counts prefill and decode; tokens are the answer's tokens plus the end-of-turn token where it stopped.

Part 1, generation: `tunelab.infer.generate` on the same Alpaca instructions, greedy, `--max-new-tokens`, with
batch_size=1 (each prompt alone) and batch_size=16. tokens/s counts the tokens each answer really has (its
re-tokenised text plus the end-of-turn token where it stopped before the limit), not the padding a finished row
of a batch keeps computing.

Part 2, evaluation: the `tunelab eval` command's function (`tunelab.evaluate.runner.run_eval`: model loading,
perplexity over every record with training's masking, greedy generation + BLEU on up to `--eval-records`
records) over the same records with `--batch-size 16` and with `--batch-size 1` (one prompt at a time). Reported:
wall seconds, records/s, BLEU, and how many predictions are identical between the two (fp32: all, or nearly; in
bf16 left padding changes rounding and a near-tie can flip a token).

The machine is usually shared: compare the rows of one run only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alpaca_records, fmt, machine_summary, text_table  # noqa: E402

BUNDLED = "bundled:smollm2-135m-instruct"


def answer_tokens(tok, answers: list[str], limit: int) -> int:
    return sum(min(len(tok(a, add_special_tokens=False)["input_ids"]) + 1, limit) for a in answers)


def _hf_generate_one(model, tok, convo, max_new_tokens: int) -> str:
    """(a): what `tunelab.infer.generate` did before, for one prompt: transformers' generate, greedy."""
    import torch
    from transformers import GenerationConfig

    from tunelab.data.template import render
    from tunelab.model.stop_tokens import stop_token_ids

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(tok),
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    ids = torch.tensor([tok(render(tok, convo, add_generation_prompt=True), add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def export_q8_0(out_dir: Path, say) -> Path:
    """The bundled model's GGUF, q8_0, written by the project's exporter (tunelab export --format gguf)."""
    from tunelab.export.gguf import export_gguf
    from tunelab.model.loading import ensure_bundled

    t0 = time.perf_counter()
    report = export_gguf(ensure_bundled(), out_dir / "smollm2-135m-q8_0.gguf", quant="q8_0", modelfile=False,
                         verify=False)
    say(f"  exported {report.output} ({report.size_bytes / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    return Path(report.output)


def _llama_cpp_one(llm, tok, convo, max_new_tokens: int) -> str:
    """(c): llama.cpp, greedy, on the same prompt tokens, stopping on the same end-of-turn tokens."""
    from tunelab.data.template import render
    from tunelab.model.stop_tokens import stop_token_ids

    ids = tok(render(tok, convo, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    stops, out = set(stop_token_ids(tok)), []
    llm.reset()
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        if int(t) in stops:
            break
        out.append(int(t))
        if len(out) == max_new_tokens:
            break
    return tok.decode(out, skip_special_tokens=True).strip()


def bench_single_stream(model, tok, prompts: list[str], max_new_tokens: int, gguf: Path | None, threads: int,
                        say) -> list[dict]:
    from tunelab.infer import as_conversation, generate

    engines = {"transformers generate (before)": lambda c: _hf_generate_one(model, tok, c, max_new_tokens),
               "tunelab infer (now)": lambda c: generate(model, tok, [c], max_new_tokens=max_new_tokens,
                                                         batch_size=1, weights="model")[0],
               "tunelab infer, int8 weights (opt-in)": lambda c: generate(
                   model, tok, [c], max_new_tokens=max_new_tokens, batch_size=1, weights="int8")[0]}
    if gguf is not None:
        from llama_cpp import Llama

        try:  # use_extra_bufts=False: llama.cpp's AMX kernels crash on some Xeons (docs/machine-notes)
            llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
                        use_mmap=False, use_extra_bufts=False)
        except TypeError:
            llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
                        use_mmap=False)
        engines["llama.cpp q8_0 (llama-cpp-python)"] = lambda c: _llama_cpp_one(llm, tok, c, max_new_tokens)
    convos = [as_conversation(p) for p in prompts]
    for fn in engines.values():  # warm-up: allocations, kernel choice, weight packing
        fn(as_conversation("Hi"))
    secs = dict.fromkeys(engines, 0.0)
    answers: dict[str, list[str]] = {name: [] for name in engines}
    for i, convo in enumerate(convos):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            answers[name].append(fn(convo))
            secs[name] += time.perf_counter() - t0
        say(f"  prompt {i + 1}/{len(convos)}: " + ", ".join(
            f"{name.split(' (')[0]} {answer_tokens(tok, answers[name], max_new_tokens) / secs[name]:.1f} tok/s"
            for name in engines))
    before, now = list(engines)[:2]
    rows = []
    for name in engines:
        tokens = answer_tokens(tok, answers[name], max_new_tokens)
        rows.append({"engine": name, "prompts": len(convos), "seconds": secs[name], "tokens": tokens,
                     "tokens_per_s": tokens / secs[name],
                     "same_as_before": sum(a == b for a, b in zip(answers[name], answers[before])),
                     "same_as_now": sum(a == b for a, b in zip(answers[name], answers[now]))})
    return rows


def bench_generation(model, tok, prompts: list[str], max_new_tokens: int, batch_sizes: list[int], say) -> list[dict]:
    from tunelab.infer import as_conversation, generate

    convos = [as_conversation(p) for p in prompts]
    generate(model, tok, convos[:2], max_new_tokens=4, batch_size=2, weights="model")  # warm-up
    rows, reference = [], None
    for bs in batch_sizes:
        t0 = time.perf_counter()
        answers = generate(model, tok, convos, max_new_tokens=max_new_tokens, batch_size=bs, weights="model")
        secs = time.perf_counter() - t0
        tokens = answer_tokens(tok, answers, max_new_tokens)
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference))
        rows.append({"batch_size": bs, "prompts": len(convos), "seconds": secs, "tokens": tokens,
                     "tokens_per_s": tokens / secs, "same_as_first": same})
        say(f"  generate batch {bs}: {tokens} tokens in {secs:.1f} s = {tokens / secs:.1f} tok/s")
    return rows


def bench_eval(model_name: str, data_dir: Path, n: int, max_new_tokens: int, batch_sizes: list[int], dtype: str,
               out_dir: Path, say) -> list[dict]:
    from tunelab.evaluate.runner import run_eval

    rows, reference = [], None
    for bs in batch_sizes:
        t0 = time.perf_counter()
        run = run_eval(model_name, None, str(data_dir), metrics="perplexity,bleu", name=f"bench-bs{bs}",
                       split="train", max_samples=n, max_new_tokens=max_new_tokens, batch_size=bs, dtype=dtype,
                       output_dir=out_dir)
        secs = time.perf_counter() - t0
        preds = [p["prediction"] for p in run.result.predictions]
        reference = reference or preds
        rows.append({"batch_size": bs, "records": run.record["data"]["records"], "generated": len(preds),
                     "seconds": secs, "records_per_s": len(preds) / secs, "bleu": run.result.metrics.get("bleu"),
                     "perplexity": run.result.metrics.get("perplexity"),
                     "same_predictions": sum(a == b for a, b in zip(preds, reference))})
        say(f"  eval batch {bs}: {len(preds)} records in {secs:.1f} s, BLEU {fmt(rows[-1]['bleu'], '.2f')}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 prompts x 32 tokens; eval over 32 records x 32 tokens")
    ap.add_argument("--model", default=BUNDLED)
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--prompts", type=int, help="prompts for the generation part (default 16; --quick 8)")
    ap.add_argument("--max-new-tokens", type=int, help="new tokens per answer (default 128; --quick 32)")
    ap.add_argument("--eval-records", type=int, help="records for the eval part (default 200; --quick 32)")
    ap.add_argument("--eval-new-tokens", type=int, help="new tokens per eval answer (default 64; --quick 32)")
    ap.add_argument("--skip-eval", action="store_true", help="only the generation part")
    ap.add_argument("--skip-batched", action="store_true", help="skip the batch 1 vs 16 generation table")
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out of the single-stream table")
    ap.add_argument("--threads", type=int, help="torch (and llama.cpp) threads; default torch's own choice")
    ap.add_argument("--single-prompts", type=int, help="prompts for the single-stream part (default: --prompts)")
    ap.add_argument("--json", help="write the measurements to this JSON file")
    args = ap.parse_args(argv)
    n_prompts = args.prompts or (8 if args.quick else 16)
    new_tokens = args.max_new_tokens or (32 if args.quick else 128)
    n_eval = args.eval_records or (32 if args.quick else 200)
    eval_tokens = args.eval_new_tokens or (32 if args.quick else 64)
    say = lambda s: print(s, flush=True)  # noqa: E731
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # before machine_summary, which reports the count

    from tunelab.data.prepare import prepare_dataset
    from tunelab.infer import load
    from tunelab.model.loading import choose_dtype

    recs, source = alpaca_records()
    prompts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in recs[-n_prompts:]]
    machine = machine_summary()
    choice = choose_dtype(args.dtype)
    dtype = choice.name
    say(f"bench/generate.py: {args.model}, {dtype} ({choice.reason}), {machine['cpu']} ({machine['cpu_kind']}), "
        f"{machine['torch_threads']} threads; data {source}")
    t0 = time.perf_counter()
    model, tok = load(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    import torch

    threads = torch.get_num_threads()
    load_avg = [round(x, 2) for x in os.getloadavg()]
    say(f"load average at the start: {load_avg}")
    single: list[dict] = []
    gen: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-gen-") as tmp:
        gguf = None
        if not args.no_llama_cpp:
            if importlib.util.find_spec("llama_cpp") is None:
                say("  llama.cpp row skipped: pip install 'tunelab[llamacpp]' (llama-cpp-python)")
            else:
                gguf = export_q8_0(Path(tmp), say)
        n_single = args.single_prompts or n_prompts
        say(f"single stream: {n_single} prompts x <= {new_tokens} new tokens, {threads} threads "
            f"(model loaded in {load_s:.1f} s)")
        single = bench_single_stream(model, tok, prompts[:n_single], new_tokens, gguf, threads, say)
        if not args.skip_batched:
            say(f"generation: {n_prompts} prompts x <= {new_tokens} new tokens")
            gen = bench_generation(model, tok, prompts, new_tokens, [1, 16], say)
    load_end = [round(x, 2) for x in os.getloadavg()]
    del model
    ev: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-gen-") as tmp:
        if not args.skip_eval:
            raw = Path(tmp) / "eval.json"
            raw.write_text(json.dumps(recs[:n_eval], ensure_ascii=False), encoding="utf-8")
            prepared = prepare_dataset([str(raw)], Path(tmp) / "prepared", tokenizer=tok, max_length=512,
                                       val_ratio=0.0, console=lambda *_: None)
            prepared.raise_if_unusable()
            say(f"evaluation (`tunelab eval`: perplexity + BLEU): {n_eval} records x <= {eval_tokens} new tokens")
            ev = bench_eval(args.model, Path(tmp) / "prepared", n_eval, eval_tokens, [16, 1], args.dtype,
                            Path(tmp) / "eval", say)

    print()
    print(f"Single stream (batch 1), {len(single and prompts[:n_single])} Alpaca prompts, greedy, <= {new_tokens} new "
          f"tokens, {dtype}, {threads} threads, {machine['cpu_kind']}, load average {load_avg} -> {load_end}")
    base = single[0]["tokens_per_s"]
    print(text_table(["engine", "seconds", "answer tokens", "tokens/s", "vs before", "same answers as before",
                      "same as now"],
                     [[r["engine"], fmt(r["seconds"]), str(r["tokens"]), fmt(r["tokens_per_s"]),
                       fmt(r["tokens_per_s"] / base, ".2f") + "×", f"{r['same_as_before']}/{r['prompts']}",
                       f"{r['same_as_now']}/{r['prompts']}"] for r in single]))
    cpp = [r for r in single if r["engine"].startswith("llama.cpp")]
    for r in single[1:] if cpp else []:
        if r is not cpp[0]:
            print(f"{r['engine']} / llama.cpp q8_0: {r['tokens_per_s'] / cpp[0]['tokens_per_s']:.2f}")
    if gen:
        print()
        print(f"Generation: tunelab.infer.generate, {n_prompts} Alpaca prompts, greedy, <= {new_tokens} new tokens, "
              f"{dtype}, {machine['torch_threads']} threads")
        base = gen[0]["tokens_per_s"]
        print(text_table(["batch size", "seconds", "answer tokens", "tokens/s", "vs batch 1", "same answers"],
                         [[str(r["batch_size"]), fmt(r["seconds"]), str(r["tokens"]), fmt(r["tokens_per_s"]),
                           fmt(r["tokens_per_s"] / base, ".1f") + "×", f"{r['same_as_first']}/{r['prompts']}"]
                          for r in gen]))
    if ev:
        print()
        print(f"Evaluation: run_eval (`tunelab eval`) over {ev[0]['records']} records: perplexity + greedy BLEU, "
              f"<= {eval_tokens} new tokens")
        slow = ev[-1]["seconds"]
        print(text_table(["batch size", "seconds", "records/s", "speed-up", "BLEU", "perplexity", "same predictions"],
                         [[str(r["batch_size"]), fmt(r["seconds"]), fmt(r["records_per_s"], ".2f"),
                           fmt(slow / r["seconds"], ".1f") + "×", fmt(r["bleu"], ".2f"), fmt(r["perplexity"], ".3f"),
                           f"{r['same_predictions']}/{r['generated']}"] for r in ev]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "dtype": dtype, "model": args.model,
                                               "data": source, "load_average": [load_avg, load_end],
                                               "single_stream": single, "generation": gen, "eval": ev,
                                               "settings": {"prompts": n_prompts, "max_new_tokens": new_tokens,
                                                            "eval_records": n_eval,
                                                            "eval_new_tokens": eval_tokens}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
