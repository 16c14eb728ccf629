"""The tokenizer as prepare uses it: a caching proxy that makes encoding many records fast, and its identity
(vocabulary and chat template hashes) for the fingerprint.

    tok = FastTokenizer(tokenizer)         # answers like the tokenizer, faster on batches of records
    tokenizer_identity(tokenizer)          # {"name", "vocab_sha256", "chat_template_sha256", "eos_token"}
"""

from __future__ import annotations

import hashlib
import json
import weakref

from tunelab.data.formats import Conversation

__all__ = ["FastTokenizer", "tokenizer_identity"]


class FastTokenizer:
    """Delegates to a transformers tokenizer, with two caches that make `encode_record` fast on many records.

    `template._eos_ids` calls ``get_vocab()`` (a fresh 49k-entry dict) several times per record: cached here.
    `encode_record` renders the same prefixes of one conversation more than once: memoised (the key is the
    identity of the prefix's last message, valid while the caller holds those messages; ``begin()`` clears it).
    ``pretokenize`` renders a batch of conversations and tokenises them together (parallel in the Rust
    tokenizer); a later ``tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)`` of one of those
    texts is answered from there, any other text goes straight to the Rust tokenizer. The results are identical
    to the tokenizer's own (a test checks it), without the per-call BatchEncoding overhead.
    """

    def __init__(self, tok):
        self._tok, self._vocab, self._renders, self._pretok = tok, None, {}, {}
        backend = getattr(tok, "_tokenizer", None)
        self._backend = backend if hasattr(backend, "encode") and hasattr(backend, "encode_batch") else None

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def begin(self) -> None:
        self._renders.clear()
        self._pretok.clear()

    @staticmethod
    def _key(conversation, add_generation_prompt: bool, tools) -> tuple:
        return (len(conversation), id(conversation[-1]) if conversation else 0, bool(add_generation_prompt),
                id(tools))

    def pretokenize(self, convs: list[Conversation], train_on: str = "assistant") -> None:
        """Render (batched, the official API) the texts `encode_record` will ask for, then tokenise together."""
        if self._backend is None:
            return
        wanted: dict[bool, list[list[dict]]] = {False: [], True: []}
        for c in convs:
            if c.tools:
                continue
            m = c.messages
            wanted[False].append(m)
            idx = [] if train_on == "all" else [i for i, x in enumerate(m) if x["role"] == "assistant"]
            for i in idx[-1:] if train_on == "last_assistant" else idx:
                if i:
                    wanted[True].append(m[:i])
                if i + 1 < len(m):
                    wanted[False].append(m[: i + 1])
        for gen, group in wanted.items():
            if not group:
                continue
            try:
                texts = self._tok.apply_chat_template(group, tokenize=False, add_generation_prompt=gen)
            except Exception:  # one record the template refuses: leave them all to the per-record path
                continue
            for m, text in zip(group, texts):
                self._renders[self._key(m, gen, None)] = text
        texts = []
        for c in convs:
            try:  # the same call as template.render: found in the memo, or rendered now (records with tools)
                kwargs = {"tools": c.tools} if c.tools else {}
                texts.append(self.apply_chat_template(c.messages, tokenize=False, add_generation_prompt=False,
                                                      **kwargs))
            except Exception:  # the record's own encode reports it
                pass
        try:
            batch = self._backend.encode_batch(texts, add_special_tokens=False)
        except Exception:  # e.g. a TypeError for text the Rust side refuses: each record's own encode reports it
            return
        for text, enc in zip(texts, batch):
            self._pretok[text] = (enc.ids, enc.offsets)

    def get_vocab(self):
        if self._vocab is None:
            self._vocab = self._tok.get_vocab()
        return self._vocab

    def apply_chat_template(self, conversation, *args, **kwargs):
        if args or kwargs.get("tokenize", True) or kwargs.keys() - {"tokenize", "add_generation_prompt", "tools"}:
            return self._tok.apply_chat_template(conversation, *args, **kwargs)
        key = self._key(conversation, kwargs.get("add_generation_prompt"), kwargs.get("tools"))
        if key not in self._renders:
            self._renders[key] = self._tok.apply_chat_template(conversation, **kwargs)
        return self._renders[key]

    def __call__(self, text, *args, **kwargs):
        if (self._backend is not None and isinstance(text, str) and not args
                and kwargs == {"add_special_tokens": False, "return_offsets_mapping": True}):
            hit = self._pretok.get(text)
            if hit is not None:
                return {"input_ids": hit[0], "offset_mapping": hit[1]}
            enc = self._backend.encode(text, add_special_tokens=False)
            return {"input_ids": enc.ids, "offset_mapping": enc.offsets}
        return self._tok(text, *args, **kwargs)


# tokenizer -> (its size, sha256 of its vocabulary): hashing 49k entries takes ~0.2 s, once per tokenizer object
# is enough (a vocabulary only changes by adding tokens, which changes the size).
_VOCAB_SHA256: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab_sha256(tok) -> str:
    size = len(tok)
    cached = _VOCAB_SHA256.get(tok)
    if cached is not None and cached[0] == size:
        return cached[1]
    h = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()).hexdigest()
    try:
        _VOCAB_SHA256[tok] = (size, h)
    except TypeError:  # not weak-referenceable: hash again next time
        pass
    return h


def tokenizer_identity(tok) -> dict[str, str]:
    h = _vocab_sha256(tok)
    template = getattr(tok, "chat_template", None) or ""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {"name": str(getattr(tok, "name_or_path", "") or type(tok).__name__), "vocab_sha256": h,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "eos_token": str(getattr(tok, "eos_token", ""))}
