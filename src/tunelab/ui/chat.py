"""Side-by-side chat: the base model's and the fine-tuned model's answers, streamed together.

Models are loaded with `tunelab.infer.load` and answers come from `tunelab.infer.stream_generate`, as in
`tunelab infer --compare`; both sides use the chat template saved with the fine-tuned model. Generation runs in
worker threads: the event loop only moves text pieces from a queue to the browser.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import AsyncIterator

from tunelab.errors import TunelabError


class ModelPair:
    """The fine-tuned model and its base, each with a lock (one generation at a time per model)."""

    def __init__(self, target: Path):
        from tunelab.infer import load
        from tunelab.model.loading import base_model_of, resolve_adapter_dir

        adapter_dir = resolve_adapter_dir(str(target))
        if (adapter_dir / "adapter_config.json").is_file():
            self.base_name = base_model_of(adapter_dir)
            self.tuned, self.tokenizer = load(None, adapter=str(adapter_dir))
        else:  # a merged model folder, or a full fine-tune's checkpoint
            meta = adapter_dir / "tunelab.json"
            self.base_name = json.loads(meta.read_text()).get("base_model") if meta.is_file() else None
            if not self.base_name:
                raise TunelabError(f"{adapter_dir} records no base model (tunelab.json) to compare against")
            self.tuned, self.tokenizer = load(str(adapter_dir))
        # a second copy of the base weights: the adapter model's disable_adapter() is not safe while the
        # tuned side generates at the same time
        self.base, _ = load(self.base_name)
        self.locks = {"base": threading.Lock(), "tuned": threading.Lock()}


def weights_stamp(target: Path) -> tuple:
    """Which weights `target` holds now: (name, inode, mtime_ns, size) of each file in the folder it loads from, so a
    run folder trained again or a model merged again is loaded again instead of answering with the old weights."""
    from tunelab.model.loading import resolve_adapter_dir

    try:
        folder = resolve_adapter_dir(str(target))
        with os.scandir(folder) as it:
            files = [(e.name, e.stat()) for e in it if e.is_file()]
    except (TunelabError, OSError):  # nothing loadable there: loading says why
        return ()
    return tuple(sorted((name, st.st_ino, st.st_mtime_ns, st.st_size) for name, st in files))


class ChatModels:
    """A small cache of loaded model pairs (loading is the slow part of the first question), keyed by folder and
    checked against the files' identity on every question."""

    def __init__(self, size: int = 2):
        self.size = size
        self._pairs: OrderedDict[str, tuple[tuple, ModelPair]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, target: Path) -> ModelPair:
        key, stamp = str(target.resolve()), weights_stamp(target)
        with self._lock:
            hit = self._pairs.pop(key, None)  # a changed folder's old pair is dropped before the new one loads
            if hit is None or hit[0] != stamp:
                hit = (stamp, ModelPair(target))
            self._pairs[key] = hit
            while len(self._pairs) > self.size:
                self._pairs.popitem(last=False)
            return hit[1]


def _generate_side(pair: ModelPair, side: str, messages, gen: dict, put, result) -> None:
    """Worker thread: stream one side's answer into the queue as (side, piece) events."""
    from tunelab.infer import fit_conversation, stream_generate

    model = pair.base if side == "base" else pair.tuned
    try:
        # a long conversation keeps its latest turns: the oldest are left out once they no longer fit the context
        ids, _, _ = fit_conversation(model, pair.tokenizer, messages, gen["max_new_tokens"])
        with pair.locks[side]:
            for piece in stream_generate(model, pair.tokenizer, ids, result, **gen):
                put(("piece", side, piece))
        put(("done", side, result.finish_reason))
    except Exception as e:  # noqa: BLE001 - shown in that side's column
        put(("error", side, f"{type(e).__name__}: {e}"))


async def stream_pair(models: ChatModels, target: Path, conversations: dict[str, list], gen: dict,
                      disconnected) -> AsyncIterator[str]:
    """Server-sent events: `load`, then `piece`/`done`/`error` events tagged base or tuned."""
    from tunelab.infer import StreamResult

    loop = asyncio.get_running_loop()
    yield _sse("status", {"text": "loading"})
    try:
        pair = await asyncio.to_thread(models.get, target)
    except Exception as e:  # noqa: BLE001
        yield _sse("error", {"side": "both", "text": f"{type(e).__name__}: {e}"})
        return
    yield _sse("status", {"text": "generating", "base_model": pair.base_name})
    queue: asyncio.Queue = asyncio.Queue()
    results = {side: StreamResult() for side in ("base", "tuned")}
    for side in results:
        threading.Thread(target=_generate_side, daemon=True,
                         args=(pair, side, conversations[side], gen,
                               lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), results[side])).start()
    open_sides = set(results)
    try:
        while open_sides:
            try:
                kind, side, text = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await disconnected():
                    break
                continue
            if kind != "piece":
                open_sides.discard(side)
            yield _sse(kind, {"side": side, "text": text})
    finally:
        for r in results.values():  # the browser went away: stop generating at the next token
            if open_sides:
                r.cancel.set()
    yield _sse("end", {})


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
