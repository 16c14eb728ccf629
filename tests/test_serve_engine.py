"""The continuous-batching engine on its own: rows that stop early leave the batch without disturbing the others."""

from __future__ import annotations

import threading

import pytest


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch

    from tunelab.infer import load

    model, tok = load(str(tiny_model_dir), dtype="fp32")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)  # larger random weights: answers differ by prompt
    return model, tok


def prompt_ids(tok, text: str) -> list[int]:
    from tunelab.data.template import render

    return tok(render(tok, [{"role": "user", "content": text}], add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


def run(engine, jobs):
    done = threading.Semaphore(0)
    for job in jobs:
        job.sink = lambda piece: piece is None and done.release()
        engine.submit(job)
    for _ in jobs:
        assert done.acquire(timeout=120)
    return jobs


@pytest.fixture()
def engine(tiny):
    from tunelab.serve import Engine

    eng = Engine(*tiny, max_batch_size=4, max_queue=4)
    eng.start()
    yield eng
    eng.stop()


def test_a_row_that_hits_eos_leaves_and_the_rest_are_unchanged(engine, tiny):
    from tunelab.serve import Job, Sampling

    model, tok = tiny
    texts = ["Tell me a story about a dragon", "Hi", "What is the capital of France and why?"]
    alone = [run(engine, [Job(prompt_ids(tok, t), Sampling(12))])[0] for t in texts]
    # make the 4th token of the short prompt's answer an end-of-turn token: that row stops mid-batch
    fourth = tok(alone[1].text, add_special_tokens=False)["input_ids"][3]
    engine.eos = engine.eos | {fourth}
    together = run(engine, [Job(prompt_ids(tok, t), Sampling(12)) for t in texts])
    assert together[1].finish_reason == "stop" and together[1].completion_tokens == 4  # EOS counted, not shown
    assert alone[1].text.startswith(together[1].text) and len(together[1].text) < len(alone[1].text)
    for a, b in zip([alone[0], alone[2]], [together[0], together[2]]):
        if fourth not in tok(a.text, add_special_tokens=False)["input_ids"]:  # unaffected by the extra EOS
            assert (b.text, b.finish_reason, b.completion_tokens) == (a.text, "length", 12)
    assert engine.load() == {"active": 0, "queued": 0, "capacity": 8}


def test_seeded_sampling_is_per_row(engine, tiny):
    from tunelab.serve import Job, Sampling

    model, tok = tiny
    ids = prompt_ids(tok, "Hi")
    sampled = Sampling(10, temperature=1.0, top_p=0.9, seed=7)
    alone = run(engine, [Job(ids, sampled)])[0].text
    with_others = run(engine, [Job(ids, Sampling(10)), Job(ids, sampled), Job(ids, Sampling(10, temperature=1.0))])
    assert with_others[1].text == alone  # its own generator: the other rows' draws do not shift it
    greedy = run(engine, [Job(ids, Sampling(10))])[0].text
    assert with_others[0].text == greedy


def test_extreme_sampling_values_are_greedy_in_effect_and_never_fail_the_batch(engine, tiny):
    """A temperature of 1e-45 (or a repetition penalty of 1e-37) made inf / inf = nan probabilities, and the error
    failed every request prefilled in the same batch (500s for other clients)."""
    import torch

    from tunelab.errors import TunelabError
    from tunelab.serve import Engine, Job, Sampling

    model, tok = tiny
    ids = prompt_ids(tok, "Hi")
    greedy = run(engine, [Job(ids, Sampling(8))])[0].text
    odd = [Sampling(8, temperature=1e-45, seed=1), Sampling(8, temperature=0.01, repetition_penalty=1e-37, seed=1),
           Sampling(8, temperature=1.0, top_p=1e-9, seed=1)]
    for flush in (False, True):  # True: as in a process that has trained (its threads read 1e-45 as 0)
        torch.set_flush_denormal(flush)
        eng = Engine(*tiny, max_batch_size=4, max_queue=4)  # its worker thread inherits the setting
        try:
            eng.start()
            jobs = run(eng, [Job(ids, Sampling(8))] + [Job(ids, s) for s in odd])
        finally:
            eng.stop()
            torch.set_flush_denormal(False)
        assert all(j.error is None and j.finish_reason in ("stop", "length") for j in jobs), \
            [(j.error, j.finish_reason) for j in jobs]
        assert jobs[0].text == jobs[1].text == jobs[3].text == greedy  # top_p keeps the best one
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(repetition_penalty=0.0), dict(temperature=float("nan"))):
        with pytest.raises(TunelabError, match="sampling: "):
            Sampling(8, **bad)
    with pytest.raises(TunelabError, match="max_batch_size=0: it must be at least 1"):
        type(engine)(*tiny, max_batch_size=0)


def test_capacity_is_batch_plus_queue_and_release_frees_a_slot_at_once(tiny):
    from tunelab.serve import Engine, Job, QueueFull, Sampling

    engine = Engine(*tiny, max_batch_size=2, max_queue=3)  # not started: nothing leaves the queue by itself
    jobs = [Job([1, 2, 3], Sampling(4)) for _ in range(5)]
    for job in jobs:
        engine.submit(job)
    with pytest.raises(QueueFull):
        engine.submit(Job([1, 2, 3], Sampling(4)))
    engine.release(jobs[0])  # e.g. its client disconnected
    engine.release(jobs[0])  # idempotent
    assert jobs[0].cancel.is_set() and engine.load()["active"] + engine.load()["queued"] == 4
    engine.submit(Job([1, 2, 3], Sampling(4)))


def test_load_counts_a_released_job_left_in_the_queue_in_neither_running_nor_queued(tiny):
    """/health said one running and one queued with one running and none queued: a cancelled job still sitting in
    the queue was counted as queued and taken off the running ones."""
    import torch

    from tunelab.serve import Engine, Job, Sampling

    engine = Engine(*tiny, max_batch_size=1, max_queue=4)  # not started: the test admits by hand
    jobs = [Job([1, 2, 3], Sampling(4)) for _ in range(3)]
    for job in jobs:
        engine.submit(job)
    with torch.inference_mode():
        engine._admit()  # the first one takes the only row
    assert engine.load() == {"active": 1, "queued": 2, "capacity": 5}
    engine.release(jobs[1])  # its client left while it waited
    assert engine.load() == {"active": 1, "queued": 1, "capacity": 5}
    engine.release(jobs[0])
    with torch.inference_mode():
        engine._step()  # the running one leaves; the released one is dropped, the last one admitted
        engine._admit()
    assert engine.load() == {"active": 1, "queued": 0, "capacity": 5} and jobs[1].finish_reason == "cancelled"


def test_prompts_waiting_together_are_prefilled_in_one_padded_forward(tiny):
    from tunelab.serve import Engine, Job, Sampling

    model, tok = tiny
    texts = ["Tell me a story about a dragon", "Hi", "What is the capital of France and why is it so big?"]
    engine = Engine(model, tok, max_batch_size=4, max_queue=4)
    jobs = [Job(prompt_ids(tok, t), Sampling(8 + i)) for i, t in enumerate(texts)]
    done = threading.Semaphore(0)
    for job in jobs:
        job.sink = lambda piece: piece is None and done.release()
        engine.submit(job)  # all three wait before the worker starts, so they are admitted together
    engine.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=120)
        assert engine.stats["prefills"] == 1
        alone = [run(engine, [Job(prompt_ids(tok, t), Sampling(8 + i))])[0] for i, t in enumerate(texts)]
    finally:
        engine.stop()
    assert [(j.text, j.completion_tokens) for j in jobs] == [(a.text, a.completion_tokens) for a in alone]


def test_the_worker_decodes_with_the_threads_it_was_given(tiny):
    """`tunelab serve` loads with one torch thread and hands the engine the thread count to decode with."""
    import torch

    from tunelab.serve import Engine, Job, Sampling

    seen = []
    before = torch.get_num_threads()
    engine = Engine(*tiny, max_batch_size=2, max_queue=2, threads=1)
    engine.start()
    try:
        done = threading.Event()
        job = Job(prompt_ids(tiny[1], "Hi"), Sampling(2))
        job.sink = lambda piece: seen.append(torch.get_num_threads()) or (piece is None and done.set())
        engine.submit(job)
        assert done.wait(120)
    finally:
        engine.stop()
        torch.set_num_threads(before)  # the worker's setting is process-wide for threads started later
    assert seen and set(seen) == {1}


def test_each_step_decodes_a_few_tokens_not_the_whole_answer(tiny):
    """Every step decoded the whole answer so far to find its new text: quadratic in the answer's length, in the
    worker thread, for every row (~1 ms a row a step at 2,000 tokens). The text is still the whole answer's."""
    from tunelab.serve import Engine, Job, Sampling

    model, tok = tiny
    sizes = []

    class Counting:  # the tokenizer, noting how many tokens each decode is given
        def decode(self, ids, **kw):
            sizes.append(len(ids))
            return tok.decode(ids, **kw)

    engine = Engine(model, tok, max_batch_size=2)
    engine.tokenizer = Counting()
    jobs = [Job(prompt_ids(tok, t), Sampling(200)) for t in ("Tell me a story about a dragon", "¿Qué tal? 你好")]
    engine.eos = set()  # every answer runs its 200 tokens
    engine.run(jobs)
    for job in jobs:
        assert len(job.tokens) == 200 and job.text == tok.decode(job.tokens, skip_special_tokens=True)
    assert max(sizes) <= 8, sorted(sizes)[-5:]
