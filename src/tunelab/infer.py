"""Generation: batched answers, a streaming chat loop, a file of prompts, and base-vs-fine-tuned side by side.

    model, tok = load("models/merged")                         # or load(base, adapter="outputs/run")
    generate(model, tok, [[{"role": "user", "content": "Who are you?"}]])  # -> ["I am ..."]
    chat_loop(model, tok)                                                  # /reset, /system TEXT, /exit
    answer_file(model, tok, "prompts.jsonl", "answers.jsonl")
    rows = compare_answers("bundled:smollm2-135m-instruct", "outputs/run", ["Who are you?"])

Every prompt is rendered with the chat template saved with the model or adapter (the one used in training), and
generation stops on EOS and the template's end-of-turn token. Greedy unless temperature > 0. Decoding is the
serve engine's loop (`tunelab.serve.engine`, with the step of `tunelab.decode`: a preallocated KV cache and a lean
forward): prompts sorted by length decode together, up to `batch_size` at a time; on 2 CPU cores a batch of 16 is
several times faster in tokens/s than one prompt at a time (see bench/generate.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunelab.data.template import CONTROL_TOKEN_WHY, find_control_tokens, prompt_messages, render
from tunelab.errors import TunelabError
from tunelab.files import read_user_text, staging_file
from tunelab.model.loading import load_pretrained as load  # noqa: F401 (the one loader, as infer.load)

Conversation = list[dict[str, Any]]
log = logging.getLogger(__name__)


def _sampling(max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float,
              seed: int | None):
    from tunelab.serve.engine import Sampling

    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    repetition_penalty=repetition_penalty, seed=seed)


def _set_weights(model, weights: str | None) -> None:
    if weights is not None:
        from tunelab.decode import set_decode_weights

        set_decode_weights(model, weights)


def require_chat_template(tokenizer, name: str) -> None:
    """Refuse, before the first prompt, a model whose tokenizer has no chat template: every prompt is rendered
    with it, and transformers' own error came as a traceback on the first one."""
    from tunelab.model.loading import ModelLoadError, no_chat_template

    why = no_chat_template(tokenizer, name)
    if why:
        raise ModelLoadError(why)


def as_conversation(prompt: str | Conversation, system: str | None = None) -> Conversation:
    """`prompt` as a conversation, `system` as its first turn unless it has one. `system=""` is an empty system
    turn, which templates with a default system prompt (SmolLM2's, Qwen's) then leave out; None adds none."""
    convo = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and not (convo and convo[0]["role"] == "system"):
        convo = [{"role": "system", "content": system}] + convo
    return convo


def generate(model, tokenizer, conversations: list[Conversation], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             seed: int | None = None, batch_size: int = 16, weights: str | None = None,
             labels: list[str] | None = None, chunk: int | None = None,
             on_answers: Callable[[list[str]], None] | None = None) -> list[str]:
    """Answer each conversation (rendered with add_generation_prompt). Returns the answers in input order.

    The serve engine's decode loop, run in this thread: up to `batch_size` prompts decode together and a
    finished one's place goes to the next prompt at once. Sampling is seeded per prompt (`seed`), so an answer
    does not depend on the batch it shared. `batch_size=1` decodes as a single stream, with the one-row bf16
    kernels (`tunelab.decode`: faster at batch 1, a few logits rounded differently in the last bit than in a
    batch). `weights="int8"` decodes with int8 copies of the weights (faster,
    answers close to but not the model's own; `tunelab.decode.set_decode_weights`), "model" with its own; None
    keeps what was set for this model. `labels`: how a prompt is named (default "prompt N") when it is longer
    than the context or its template cannot render it, every such prompt in one error before any is answered.
    `chunk`: answer the prompts `chunk` at a time in input order, handing each chunk's answers to `on_answers`
    as it finishes (what an interruption leaves is a prefix of the answers).
    """
    from tunelab.serve.engine import Engine, Job

    if not conversations:
        return []
    _set_weights(model, weights)
    sampling = _sampling(max_new_tokens, temperature, top_p, repetition_penalty, seed)
    jobs, problems = [], []
    for i, convo in enumerate(conversations):
        name = labels[i] if labels else i + 1
        try:
            ids = _prompt_ids(tokenizer, convo, name)
            jobs.append(Job(ids, _within_context(model, ids, sampling, name)))
        except TunelabError as e:
            problems.append(str(e))
    if problems:
        raise TunelabError("\n".join(problems))
    answers: list[str] = []
    for start in range(0, len(jobs), chunk or len(jobs)):
        part = jobs[start:start + (chunk or len(jobs))]
        # similar lengths share a batch: less padding
        Engine(model, tokenizer, max_batch_size=batch_size, max_queue=len(part)).run(
            sorted(part, key=lambda job: len(job.prompt_ids)))
        for job in part:
            if job.error is not None:
                raise job.error
        done = [tokenizer.decode(job.tokens, skip_special_tokens=True).strip() for job in part]
        for i, job in enumerate(part, start):
            if _cut_by_context(job, max_new_tokens):
                log.warning("%s left room for only %d of max_new_tokens=%d answer tokens in this model's context of "
                            "%d tokens: its answer stops there", _prompt_name(labels[i] if labels else i + 1),
                            job.completion_tokens, max_new_tokens, _context(model))
        answers += done
        if on_answers is not None:
            on_answers(done)
    return answers


def _cut_by_context(job, max_new_tokens: int) -> bool:
    """Whether `job`'s answer stopped at the end of the model's context rather than at max_new_tokens or a stop."""
    return job.finish_reason == "length" and job.completion_tokens < max_new_tokens


def _prompt_name(number: int | str | None) -> str:
    return "the prompt" if number is None else f"prompt {number}" if isinstance(number, int) else number


def _control_token_refusal(tokenizer, conversation: Conversation, which: str | None = None) -> str | None:
    """Which message of `conversation` (or `which`) holds a control token as text, and why that is refused; None
    when none does. Rendered and tokenised, "<|im_end|>" in a prompt would end its turn (or open a system turn)."""
    found = find_control_tokens(tokenizer, conversation)
    if not found:
        return None
    i, tok = found[0]
    role = conversation[i].get("role")
    which = which or (f"the {role} message" if sum(m.get("role") == role for m in conversation) == 1 else
                      f"message {i + 1} ({role})")
    return f"{which} holds {tok!r}, a control token of this model's tokenizer: {CONTROL_TOKEN_WHY}"


def _prompt_ids(tokenizer, conversation: Conversation, number: int | str | None = None) -> list[int]:
    """The token ids of `conversation` rendered with add_generation_prompt; a conversation the chat template
    refuses (roles out of the order it wants, say), or that holds a control token as text, is a TunelabError
    naming it."""
    why = _control_token_refusal(tokenizer, conversation)
    if why:
        raise TunelabError(f"{_prompt_name(number)} is refused: {why}")
    try:
        text = render(tokenizer, conversation, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError, or whatever the template's own code raised
        raise TunelabError(f"{_prompt_name(number)} cannot be rendered by the chat template: {e}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _context(model) -> int | None:
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return context if isinstance(context, int) else None


def _within_context(model, prompt_ids: list[int], sampling, number: int | str | None = None):
    """`sampling` with max_new_tokens cut to what the model's positions leave after the prompt (answers past them
    are garbage); a prompt that fills them is an error, as it is for `tunelab serve`."""
    context = _context(model)
    if context is None or len(prompt_ids) + sampling.max_new_tokens <= context:
        return sampling
    if len(prompt_ids) >= context:
        raise TunelabError(f"{_prompt_name(number)} has {len(prompt_ids)} tokens; this model's context is {context} "
                           "tokens")
    return replace(sampling, max_new_tokens=context - len(prompt_ids))


def fit_conversation(model, tokenizer, conversation: Conversation,
                     max_new_tokens: int) -> tuple[list[int], Conversation, int]:
    """The prompt ids of `conversation` with its oldest exchanges dropped until `max_new_tokens` of answer fit in
    the model's context (a system message and the last user turn always stay). Returns (ids, the conversation
    kept, how many messages were dropped); a last turn too long by itself is left to `_within_context`."""
    kept = list(conversation)
    dropped = 0
    while True:
        ids = _prompt_ids(tokenizer, kept)
        context = _context(model)
        first = 1 if kept and kept[0]["role"] == "system" else 0
        if context is None or len(ids) + max_new_tokens <= context or len(kept) - first <= 1:
            return ids, kept, dropped
        cut = next((i for i in range(first + 1, len(kept)) if kept[i]["role"] == "user"), len(kept) - 1)
        dropped += cut - first
        kept = kept[:first] + kept[cut:]


@dataclass
class StreamResult:
    """Filled in when a streamed generation ends."""
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length
    error: BaseException | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


def stream_generate(model, tokenizer, prompt_ids: list[int], result: StreamResult, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    seed: int | None = None, weights: str | None = None) -> Iterator[str]:
    """Yield text pieces as they are generated (a background thread runs the decode loop); `result` gets the totals.

    Setting `result.cancel` stops the generation at the next token (a client that went away). `weights`: as in
    `generate`.
    """
    import queue

    from tunelab.serve.engine import Engine, Job

    _set_weights(model, weights)
    pieces_q: queue.Queue[str | None] = queue.Queue()
    sampling = _within_context(model, prompt_ids, _sampling(max_new_tokens, temperature, top_p, repetition_penalty,
                                                            seed))
    job = Job(list(prompt_ids), sampling, sink=pieces_q.put, cancel=result.cancel)
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=0)
    result.prompt_tokens = len(prompt_ids)

    def work():
        try:
            engine.run([job])
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            job.error = job.error or e
            pieces_q.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    pieces: list[str] = []
    completed = False
    try:
        while (piece := pieces_q.get()) is not None:
            pieces.append(piece)
            if piece:
                yield piece
        completed = True
    finally:
        if not completed:  # the consumer stopped early: stop generating at the next token
            result.cancel.set()
        thread.join()
        result.text = "".join(pieces)
        result.completion_tokens = job.completion_tokens
        result.finish_reason = "stop" if job.finish_reason == "stop" else "length"
        result.error = job.error
    if result.error is not None:
        raise result.error


# ---------------------------------------------------------------- interactive chat

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /exit"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a chat: the session ends (`tunelab` reports it as an interrupt), where Ctrl-C only
    stops the answer being streamed."""


@contextlib.contextmanager
def _termination_ends_chat() -> Iterator[None]:
    """While chatting, the SIGTERM handler that `tunelab` installs (it raises KeyboardInterrupt) raises `Terminated`
    instead, so that the chat can tell a `kill` from a Ctrl-C. Left alone outside the main thread and where SIGTERM
    has no Python handler (default: the process ends; ignored: it stays ignored)."""
    import signal

    before = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if not callable(before):
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def chat_loop(model, tokenizer, system: str | None = None, input_fn: Callable[[str], str] = input,
              out=None, **gen: Any) -> Conversation:
    """Stream answers to what the user types, keeping the history. Returns the final conversation.

    Ctrl-C while an answer streams stops that answer and returns to the prompt (what was shown of it stays in the
    conversation, as the user saw it); Ctrl-C or Ctrl-D (end of input) at the prompt ends the session.
    """
    out = out or sys.stdout
    history: Conversation = []
    print(HELP, file=out)
    with _termination_ends_chat():
        while True:
            try:
                line = input_fn("\n>>> ")
            except (EOFError, KeyboardInterrupt) as e:
                if isinstance(e, Terminated):
                    raise
                print(file=out)  # the shell's prompt on a line of its own, not after ">>> "
                break
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                history = []
                print("(conversation cleared)", file=out)
                continue
            if cmd.startswith("/system"):
                system = cmd[len("/system"):].strip() or None
                history = []
                print(f"(system prompt {'set' if system else 'removed'}; conversation cleared)", file=out)
                continue
            if cmd.startswith("/"):
                print(f"unknown command {cmd.split()[0]}; {HELP}", file=out)
                continue
            history = _chat_turn(model, tokenizer, as_conversation(history + [{"role": "user", "content": line}],
                                                                    system), out, gen, history)
    return as_conversation(history, system)


def _chat_turn(model, tokenizer, convo: Conversation, out, gen: dict[str, Any],
               history: Conversation) -> Conversation:
    """Stream the answer to `convo` (its last turn the user's message); returns the history after it: `history`
    unchanged when the message is refused or stopped before any answer was shown."""
    why = _control_token_refusal(tokenizer, convo[-1:], "your message")
    if why:  # said of the message itself (the whole conversation's check names it by its number)
        print(f"error: {why}; message not kept", file=out)
        return history
    shown: list[str] = []  # what the user saw: the history keeps exactly that of a stopped answer
    stopped = False
    try:
        ids, convo, dropped = fit_conversation(model, tokenizer, convo, gen.get("max_new_tokens", 256))
        result = StreamResult()
        stream = stream_generate(model, tokenizer, ids, result, **gen)
        with contextlib.closing(stream):  # a Ctrl-C in print() too stops the generation before the next prompt
            for piece in stream:
                shown.append(piece)  # first: a Ctrl-C lands after print's write more often than before it
                print(piece, end="", file=out, flush=True)
    except TunelabError as e:  # longer than the context, or refused by the template: say so, keep the history
        print(f"error: {e}; message not kept{_system_share(tokenizer, convo)}", file=out)
        return history
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            raise
        stopped = True
    print(file=out)
    answer = "".join(shown).strip()
    if stopped and not answer:
        print("(stopped before the answer began; your message was not kept)", file=out)
        return history
    if stopped:
        print("(answer stopped; the part shown stays in the conversation: /reset forgets it)", file=out)
    if dropped:
        print(f"(the {dropped} oldest messages no longer fit the model's context: forgotten)", file=out)
    if not stopped and _cut_by_context(result, gen.get("max_new_tokens", 256)):
        print(f"(the answer stops at the end of the model's context of {_context(model)} tokens: your message "
              f"left room for {result.completion_tokens} tokens of answer)", file=out)
    return [m for m in convo if m["role"] != "system"] + [{"role": "assistant", "content": answer}]


def _system_share(tokenizer, convo: Conversation) -> str:
    """What the system prompt takes of a prompt too long for the context: it stays in every turn, so a long one
    leaves no room however short the message."""
    if not convo or convo[0]["role"] != "system" or not convo[0]["content"]:
        return ""
    n = len(tokenizer(convo[0]["content"], add_special_tokens=False)["input_ids"])
    return f" (the system prompt alone is {n} tokens and stays in every turn: /system TEXT sets a shorter one)"


# ---------------------------------------------------------------- files of prompts


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """JSONL lines: {"prompt": "..."}, {"messages": [...]} (a trailing assistant turn becomes the reference),
    or a plain JSON string per line. Every bad line is reported at once, as file:line: why."""
    return [row for _, row in numbered_prompts(path)]


def numbered_prompts(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, prompt row) per prompt of a file, as `read_prompts` reads them."""
    rows, problems = [], []
    # "\n" only: str.splitlines() also splits at U+2028, U+0085 ..., which JSON strings may hold as they are
    for n, line in enumerate(read_user_text(path, "prompts", encoding="utf-8-sig").split("\n"), 1):
        if line.strip():
            try:
                rows.append((n, _prompt_row(line)))
            except ValueError as e:  # the line's fault: noted, and the rest of the file still read
                problems.append(f"{path}:{n}: {e}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        head = "" if len(problems) == 1 else f"{len(problems)} lines of {path} are not prompts (nothing answered):\n"
        raise TunelabError(head + "\n".join(shown))
    if not rows:
        raise TunelabError(f"{path} holds no prompts")
    return rows


def _prompt_row(line: str) -> dict[str, Any]:
    """One line of a prompts file as {"messages", ...}; ValueError saying what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object or string, found {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                        and isinstance(m.get("role"), str) for m in msgs)):
            raise ValueError("\"messages\" must be a non-empty list of {\"role\", \"content\"} objects with text "
                             "content")
        # only a trailing assistant turn is the reference: [user, assistant, user] is a prompt, answered whole
        msgs, ref = prompt_messages(msgs) if msgs[-1]["role"] == "assistant" else (msgs, None)
        if not any(m["role"] == "user" for m in msgs):  # a trailing assistant turn is the reference, not a prompt
            raise ValueError("no user turn to answer (the last assistant turn is taken as the reference answer)")
        return {"messages": msgs, "reference": ref, **{k: v for k, v in obj.items() if k != "messages"}}
    if "prompt" in obj or "instruction" in obj:
        key = "prompt" if "prompt" in obj else "instruction"
        extra = obj.get("input") if key == "instruction" else None
        if not isinstance(obj[key], str) or not obj[key].strip() or not isinstance(extra, (str, type(None))):
            raise ValueError(f"\"{key}\" must be non-empty text")
        text = obj[key] + (f"\n\n{extra}" if extra else "")
        return {"messages": [{"role": "user", "content": text}], **obj}
    raise ValueError(f"expected a \"prompt\" or \"messages\" field, found {sorted(obj)}")


def check_batch(input_path: str | Path, output_path: str | Path,
                overwrite: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """The prompts of `input_path` with their line numbers, every bad line refused at once, and an output that
    cannot take the answers refused: all before a model is loaded (`tunelab infer --input` calls it first). An
    existing output is replaced only when it is an earlier answers file (or empty), unless `overwrite`."""
    out = Path(output_path)
    if out.is_dir():
        raise TunelabError(f"--output {out} is a folder; give the .jsonl file to write")
    if out.exists() and not out.is_file():  # the answers renamed there would replace the pipe or device
        raise TunelabError(f"--output {out} is not a regular file (a pipe or device); give the .jsonl file to write")
    if out.resolve() == Path(input_path).resolve():
        raise TunelabError(f"--output {out} is the --input file: the answers would replace the prompts; give "
                           "another file")
    why = None if overwrite else _not_answers(out)
    if why:
        raise TunelabError(f"--output {out} exists and is not an answers file ({why}); give another file, or "
                           "--overwrite to replace it")
    return numbered_prompts(input_path)


def _not_answers(path: Path) -> str | None:
    """Why the existing file `path` is not one that `answer_file` wrote (every line an object with an "answer"),
    or None: it is one, it is empty, or there is no file."""
    if not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip() and not (isinstance(row := json.loads(line), dict) and "answer" in row):
                    return f"line {n} has no \"answer\""
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not JSON lines"
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    return None


class BatchInterrupted(TunelabError):
    """A file of prompts stopped partway: the answers so far are written; the message says how far it got."""
    exit_code = 130


def answer_file(model, tokenizer, input_path: str | Path, output_path: str | Path, system: str | None = None,
                overwrite: bool = False, batch_size: int = 16, **gen: Any) -> int:
    """Answer every prompt of a JSONL file in batches; write one {"messages", "answer", ...} line per prompt.
    An existing `output_path` is replaced only when it holds earlier answers, unless `overwrite`.

    The file is answered `8 * batch_size` prompts at a time, in its order: stopped (Ctrl-C, SIGTERM) after the
    first of those, the output keeps the answers so far and `BatchInterrupted` says how far it got."""
    numbered = check_batch(input_path, output_path, overwrite)
    held = [n for n, row in numbered if "answer" in row]
    if held:
        log.warning("%d prompts of %s already hold an \"answer\" (line %d first): the output replaces it with this "
                    "model's answer (a reference answer belongs in \"reference\", or as the last assistant turn of "
                    "\"messages\")", len(held), input_path, held[0])
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)  # an output that cannot be written fails before generating
    tmp = staging_file(out)  # this process's own: not a user's X.tmp, nor another run's writing the same output
    written = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:

            def write(answers: list[str]) -> None:
                nonlocal written
                for (_, row), answer in zip(numbered[written:], answers):
                    f.write(json.dumps({**row, "answer": answer}, ensure_ascii=False) + "\n")
                f.flush()
                written += len(answers)

            try:
                generate(model, tokenizer, [as_conversation(r["messages"], system) for _, r in numbered],
                         labels=[f"{input_path}:{n}: the prompt" for n, _ in numbered], batch_size=batch_size,
                         chunk=8 * batch_size, on_answers=write, **gen)
            except KeyboardInterrupt:
                if not written:
                    raise
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    if written < len(numbered):
        raise BatchInterrupted(f"interrupted: {out} holds the answers to the first {written} of {len(numbered)} "
                               f"prompts (up to {input_path}:{numbered[written - 1][0]}); the rest were not answered")
    return written


# ---------------------------------------------------------------- side by side


def compare_answers(base_model: str | None, adapter_or_merged: str, prompts: list[str | Conversation],
                    system: str | None = None, dtype: str = "auto", labels: list[str] | None = None,
                    **gen: Any) -> list[tuple[str, str, str]]:
    """(prompt, base answer, fine-tuned answer) per prompt. `labels`: how a prompt that cannot be answered is
    named (as `generate`; "file:line: the prompt" for a file's).

    `adapter_or_merged` is a run folder, an adapter checkpoint or a merged model folder. With an adapter the
    base is loaded once and its answers come from the same weights with the adapter switched off; `base_model`
    defaults to the adapter's recorded base. Both use the chat template saved with the fine-tuned model.
    """
    from tunelab.model.loading import read_tunelab_json, resolve_adapter_dir

    convos = [as_conversation(p, system) for p in prompts]
    shown = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    target = resolve_adapter_dir(adapter_or_merged)
    if (target / "adapter_config.json").is_file():
        model, tok = load(base_model, adapter=str(target), dtype=dtype)
        require_chat_template(tok, adapter_or_merged)
        with model.disable_adapter():
            base_answers = generate(model, tok, convos, labels=labels, **gen)
        tuned_answers = generate(model, tok, convos, labels=labels, **gen)
    else:
        rec = read_tunelab_json(target)  # the base the merged model was made from, as training loaded it
        base_model = base_model or rec.get("base_model")
        tuned, tok = load(str(target), dtype=dtype)
        require_chat_template(tok, adapter_or_merged)
        if base_model is None:  # before minutes of answering, not after
            raise TunelabError(f"{target} records no base model; pass the base model to compare against")
        tuned_answers = generate(tuned, tok, convos, labels=labels, **gen)
        del tuned
        same = base_model == rec.get("base_model")
        base, _ = load(base_model, dtype=dtype, revision=rec.get("revision") if same else None,
                       trust_remote_code=bool(rec.get("trust_remote_code")) if same else None)
        base_answers = generate(base, tok, convos, labels=labels, **gen)
    return list(zip(shown, base_answers, tuned_answers))


def print_comparison(rows: list[tuple[str, str, str]], console=None, titles=("base", "fine-tuned")) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=True, expand=True)
    table.add_column("prompt", ratio=1)
    table.add_column(titles[0], ratio=2)
    table.add_column(titles[1], ratio=2)
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)
