"""Continuous batching: one worker thread owns the model and decodes every active request in one forward pass.

    engine = Engine(model, tokenizer, max_batch_size=32, max_queue=64)
    engine.start()
    job = Job([1, 2, 3], Sampling(max_new_tokens=16), stops=["\\n\\n"], sink=print)
    engine.submit(job)        # QueueFull when max_batch_size + max_queue jobs are already waiting or running
    ...
    engine.stop()

A request that arrives while others are decoding joins at the next step: the prompts that arrived since the last
step are prefilled in one forward (left-padded, each with its own position ids), then their cache is left-padded
to the batch's length (or the batch's to theirs) and appended as new rows. Every step feeds each row its last
token with its own position id and an attention mask that hides the padding; finished or cancelled rows leave the
batch at once, and columns that have become padding in every row are dropped. On CPU a decode step
of 16 rows costs little more than a step of one (the weights are read once per step either way), which is where
the aggregate throughput comes from. The step itself is `tunelab.decode`'s (a preallocated KV cache written in
place, a lean forward for Llama-family models); `tunelab infer` runs this same loop through `Engine.run`.

Each row samples with its own settings and its own seeded generator, so a seeded request gives the same answer
whatever else shares the batch. Text is handed to the job's `sink` from the worker thread as it is decoded, minus
stop strings (held back while they could still be starting) and incomplete UTF-8 sequences.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from tunelab.errors import TunelabError
from tunelab.model.stop_tokens import stop_token_ids

if TYPE_CHECKING:
    from tunelab.decode import KVCache

log = logging.getLogger(__name__)
# padded tokens (rows x longest prompt) in one prefill forward: enough for a burst of chat prompts, small enough
# that the attention scores of a burst of long prompts stay a few hundred MB
PREFILL_TOKENS = 4096
MAX_HEADROOM = 1024  # cache columns preallocated for the answers; a longer one grows the buffers (doubling)


class QueueFull(Exception):
    """Every slot (running batch + waiting queue) is taken; the client should retry later."""


class ShuttingDown(Exception):
    """The server stopped before this request finished."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        bad = [f"{name}={value!r} ({rule})" for name, value, ok, rule in (
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature, math.isfinite(self.temperature) and self.temperature >= 0,
             "0 for greedy, or more"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "above 0, at most 1"),
            ("repetition_penalty", self.repetition_penalty,
             math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "above 0"),
        ) if not ok]
        if bad:
            raise TunelabError("sampling: " + "; ".join(bad))


@dataclass(eq=False)
class Job:
    """One prompt to answer. `sink(piece)` is called from the worker with each text piece, then `sink(None)`."""
    prompt_ids: list[int]
    sampling: Sampling
    stops: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()  # tokens that end this job too: special tokens given as stop strings
    sink: Callable[[str | None], None] = lambda piece: None
    cancel: threading.Event = field(default_factory=threading.Event)
    text: str = ""  # what was handed to the sink so far
    completion_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # the generated tokens, without the end-of-turn token
    finish_reason: str | None = None  # stop | length | cancelled
    error: BaseException | None = None
    _released: bool = False
    _queued: bool = False  # submitted, not yet taken by the worker, not released

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class _Row:
    """A job in the running batch: its generated tokens, its next input and its decoding state."""

    def __init__(self, job: Job, device):
        import torch

        self.job = job
        self.tokens = job.tokens
        self.length = len(job.prompt_ids)  # tokens in the cache = position id of the next input
        self.decoded = ""  # the text of `tokens` up to the last complete character
        self.sent = 0  # characters of `decoded` handed to the sink
        self.prefix = self.read = 0  # tokens[prefix:read] ends `decoded`; tokens[read:] are not in it yet
        s = job.sampling
        self.generator = None
        if s.temperature > 0:
            self.generator = torch.Generator(device=device)
            if s.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(s.seed % 2**64)

    @property
    def greedy(self) -> bool:
        return self.generator is None and self.job.sampling.repetition_penalty == 1.0

    def detokenize(self, tokenizer) -> None:
        """Extend `decoded` with the text of the new tokens, once they end on a complete character.

        Only the last few tokens are decoded, not the whole answer at every step (a 2,000-token answer decoded whole
        cost ~1 ms a row a step, in the worker, holding the GIL); decoding them after the tokens before them keeps
        what a tokenizer does at the start of a text (SentencePiece drops the first space) out of the middle."""
        before = tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        text = tokenizer.decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if len(text) > len(before) and not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits
            self.decoded += text[len(before):]
            self.prefix, self.read = self.read, len(self.tokens)


class Engine:
    """Owns the model, the job queue and the worker thread; `submit` and `release` are safe from any thread."""

    def __init__(self, model, tokenizer, max_batch_size: int = 32, max_queue: int = 64, threads: int | None = None):
        """`threads`: torch threads for the worker (`tunelab serve` loads the model with one thread and decodes
        with these: torch's threads working from two Python threads slowed decoding by a third, bench/README.md)."""
        if max_batch_size < 1:  # no row to decode in: every job would wait forever
            raise TunelabError(f"max_batch_size={max_batch_size}: it must be at least 1")
        self.model, self.tokenizer, self.threads = model, tokenizer, threads
        self.max_batch_size, self.capacity = max_batch_size, max_batch_size + max_queue
        self.eos = set(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
        self.device = next(model.parameters()).device
        self.stats = {"finished": 0, "cancelled": 0, "failed": 0, "steps": 0, "prefills": 0}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # jobs submitted and not yet released: the slots in use
        self._waiting = 0  # of those, the ones still in the queue
        self._rows: list[_Row] = []
        from tunelab.decode import KERNELS, decode_step_for  # torch is imported when an engine is made, not before

        # the decode step infer and serve share (tunelab.decode); an engine of one row gets the one-row kernels
        self._decode = decode_step_for(model, max_rows=max_batch_size)
        self._kernels = KERNELS  # held by each prefill and step: another engine's one-row step switches oneDNN off
        self._cache: KVCache | None = None  # one row per entry of _rows, right-aligned
        self._mask = None  # [rows, cache length] 1 for real tokens, 0 for left padding
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tunelab-serve-engine", daemon=True)

    # ------------------------------------------------------------ the API the routes use

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stopping.set()
        self._queue.put(None)  # wake the worker if it is waiting for work
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise ShuttingDown("the server is shutting down")
            if self._pending >= self.capacity:
                raise QueueFull(f"all {self.capacity} slots are busy")
            self._pending += 1
            self._waiting += 1
            job._queued = True
        self._queue.put(job)

    def release(self, job: Job) -> None:
        """Free the job's slot now (idempotent); a job still running stops at the next step."""
        job.cancel.set()
        with self._lock:
            if not job._released:
                job._released = True
                self._pending -= 1
                self._dequeued(job)

    def _dequeued(self, job: Job) -> None:
        """The job has left the queue's count: taken by the worker, or released (under the lock)."""
        if job._queued:
            job._queued = False
            self._waiting -= 1

    def load(self) -> dict[str, int]:
        """Slots in use: running (decoding or being prefilled) and queued; a released job counts in neither (though
        it may sit in the queue until the worker drops it)."""
        with self._lock:
            return {"active": self._pending - self._waiting, "queued": self._waiting, "capacity": self.capacity}

    def run(self, jobs: list[Job]) -> None:
        """Answer `jobs` in the calling thread, batched as the worker would, and return when all have finished.

        `tunelab infer` uses this (an engine without its worker thread), so infer and serve decode alike.
        """
        import torch

        for job in jobs:
            self.submit(job)
        with torch.inference_mode():
            while any(job.finish_reason is None for job in jobs):
                self._admit()
                if self._rows:
                    self._step()

    # ------------------------------------------------------------ the worker

    def _run(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as e:  # noqa: BLE001 - fail the batch, keep serving the next requests
                    log.exception("generation failed; failing the %d requests in the batch", len(self._rows))
                    self._fail_all(e)
        self._fail_all(ShuttingDown("the server is shutting down"))
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._finish(job, None, ShuttingDown("the server is shutting down"))

    def _admit(self) -> None:
        """Prefill waiting jobs into free rows, together; block (briefly) only when nothing is running."""
        block, jobs, width = not self._rows, [], 0
        while len(self._rows) + len(jobs) < self.max_batch_size:
            try:
                job = self._queue.get(timeout=0.5) if block else self._queue.get_nowait()
            except queue.Empty:
                break
            block = False
            if job is not None:
                with self._lock:
                    self._dequeued(job)
            if job is None or self._stopping.is_set():
                if job is not None:
                    self._finish(job, None, ShuttingDown("the server is shutting down"))
                break
            if job.cancel.is_set():
                self._finish(job, "cancelled")
                continue
            width = max(width, len(job.prompt_ids))
            jobs.append(job)
            if width * len(jobs) >= PREFILL_TOKENS:  # bounds the prefill's activations; the rest join next step
                break
        if not jobs:
            return
        try:
            with self._kernels:
                self._prefill(jobs)
        except Exception as e:  # noqa: BLE001 - these requests fail, the running batch goes on
            log.exception("prefill failed")
            for job in jobs:
                self._finish(job, None, e)

    def _prefill(self, jobs: list[Job]) -> None:
        """One forward over the new prompts, left-padded to the longest; their first tokens; then they join."""
        import torch
        from transformers import DynamicCache

        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[0] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each prompt starts at position 0 after its padding
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        self.stats["prefills"] += 1
        rows = [_Row(job, self.device) for job in jobs]
        tokens = self._pick(rows, out.logits[:, -1, :])
        keep = [i for i, (row, token) in enumerate(zip(rows, tokens)) if self._accept(row, token)]
        if keep:
            # the decode steps write into preallocated columns: room for the longest answer asked for
            from tunelab.decode import KVCache

            room = min(max(rows[i].job.sampling.max_new_tokens for i in keep), MAX_HEADROOM)
            kv = KVCache.from_cache(cache, headroom=room)
            self._join([rows[i] for i in keep], *_select(kv, mask, keep))

    def _step(self) -> None:
        """One decode step for every row: feed each its pending token, pick the next, drop finished rows."""
        import torch

        self._drop([r for r in self._rows if r.job.cancel.is_set()])
        if not self._rows:
            return
        rows = self._rows
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        # the query's offset into the cache is the cache length for every row; its RoPE position is its
        # own length, which differs from row to row by the row's left padding
        with self._kernels:
            logits = self._decode(self._cache, ids, positions, mask)
        self._mask = mask
        self.stats["steps"] += 1
        for r in rows:
            r.length += 1
        tokens = self._pick(rows, logits)
        self._drop([r for r, t in zip(rows, tokens) if not self._accept(r, t)])

    # ------------------------------------------------------------ the batch's cache

    def _join(self, rows: list[_Row], cache: KVCache, mask) -> None:
        """Append prefilled rows: left-pad the shorter of (batch cache, new cache) so that both end together."""
        import torch
        import torch.nn.functional as F

        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._cache.join(cache)
        self._mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (self._mask, mask)])
        self._rows = self._rows + rows

    def _drop(self, gone: list[_Row]) -> None:
        """Remove rows from the batch, then the columns that are now padding in every remaining row."""
        for r in gone:
            if r.job.finish_reason is None:
                self._finish(r.job, "cancelled")
        if not gone:
            return
        keep = [i for i, r in enumerate(self._rows) if r not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = self._mask = None
            return
        self._cache, self._mask = _select(self._cache, self._mask, keep)

    def _fail_all(self, error: BaseException) -> None:
        for r in self._rows:
            self._finish(r.job, None, error)
        self._rows, self._cache, self._mask = [], None, None

    # ------------------------------------------------------------ sampling and text

    def _pick(self, rows: list[_Row], logits) -> list[int]:
        """The next token of each row: greedy, or sampled with that row's temperature, top_p and generator."""
        import torch

        logits = logits.float()
        if all(r.greedy for r in rows):
            return logits.argmax(dim=-1).tolist()
        picked = []
        for r, x in zip(rows, logits):
            s = r.job.sampling
            if s.repetition_penalty != 1.0:
                seen = torch.tensor(r.job.prompt_ids + r.tokens, device=x.device)
                score = x[seen]  # transformers' rule: shrink positive scores, push negative ones further down
                x = x.scatter(0, seen, torch.where(score > 0, score / s.repetition_penalty,
                                                   score * s.repetition_penalty))
            if r.generator is None:
                picked.append(int(x.argmax()))
                continue
            # scores relative to the best one: a tiny temperature (or a tiny repetition penalty's huge scores) then
            # gives 0 and -inf, i.e. greedy, instead of inf / inf = nan failing every row of the batch; never below
            # the smallest normal float, which flush-to-zero (training sets it for the process) would make 0 / 0
            x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max)
            probs = torch.softmax((x - x.max()) / max(s.temperature, torch.finfo(x.dtype).tiny), dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                outside = sorted_p.cumsum(0) - sorted_p >= s.top_p  # the smallest set reaching top_p stays
                outside[0] = False  # and it holds the likeliest token at least
                probs = probs.scatter(0, order, sorted_p.masked_fill(outside, 0.0))
            picked.append(int(torch.multinomial(probs, 1, generator=r.generator)))
        return picked

    def _accept(self, row: _Row, token: int) -> bool:
        """Record `token`, hand the text that is now safe to the sink; False when the row has finished."""
        job = row.job
        job.completion_tokens += 1  # the end-of-turn token counts too, as it does in transformers' output
        if token in self.eos or token in job.stop_ids:
            self._emit(row, len(row.decoded))
            self._finish(job, "stop")
            return False
        row.tokens.append(token)
        row.detokenize(self.tokenizer)
        hit = _first_stop(row.decoded, job.stops, row.sent)
        if hit is not None:
            self._emit(row, hit)
            self._finish(job, "stop")
            return False
        if len(row.tokens) >= job.sampling.max_new_tokens:
            self._emit(row, len(row.decoded))
            self._finish(job, "length")
            return False
        hold = max((len(s) - 1 for s in job.stops), default=0)  # the start of a stop string might be forming
        self._emit(row, len(row.decoded) - hold)
        return True

    def _emit(self, row: _Row, upto: int) -> None:
        if upto > row.sent:
            piece = row.decoded[row.sent:upto]
            row.sent = upto
            row.job.text += piece
            self._deliver(row.job, piece)

    def _finish(self, job: Job, reason: str | None, error: BaseException | None = None) -> None:
        job.finish_reason, job.error = reason or "error", error
        self.stats["failed" if error else "cancelled" if reason == "cancelled" else "finished"] += 1
        self.release(job)
        self._deliver(job, None)

    @staticmethod
    def _deliver(job: Job, piece: str | None) -> None:
        try:
            job.sink(piece)
        except Exception:  # noqa: BLE001 - a sink whose event loop has closed: nobody is listening any more
            log.debug("could not deliver to a finished request", exc_info=True)


def _select(cache: KVCache, mask, keep: list[int]):
    """The cache and mask of rows `keep`, without the leading columns that are padding in every one of them."""
    import torch

    if len(keep) < mask.shape[0]:
        mask = mask[torch.tensor(keep, device=mask.device)]
    first = int(mask.any(dim=0).int().argmax())  # the first column some row still uses
    cache.select(keep, first)
    return cache, mask[:, first:]


def _first_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the first stop string starts, looking only where one could start after the text already sent."""
    if not stops:
        return None
    hold = max(len(s) for s in stops) - 1
    hits = [i for i in (text.find(s, max(0, sent - hold)) for s in stops) if i >= 0]
    return min(hits) if hits else None
