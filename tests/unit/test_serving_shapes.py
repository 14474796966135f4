"""The served shapes: history buckets, beam widths over one set of weights, graphs fixed before
ready, and a batcher that fills its batches while the previous one runs.

The CUDA graphs themselves need a GPU (tests/gpu/test_kernels.py replays them); here the graph
runner records each shape's search without CUDA (same keys, same buffers, same replay contract),
so the plumbing a server relies on — which keys exist after `capture()`, that nothing is added
after it, and that a shape outside the set is answered eagerly and counted — is checked on CPU.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from onerec.engine.engine import CudaGraphRunner, Engine, EngineConfig, length_buckets
from onerec.generate import beam_search
from onerec.model import OneRecV2, OneRecV2Config
from onerec.semantic_ids import SemanticIdIndex, encode_histories
from onerec.serve.batcher import BatcherStopped, DynamicBatcher


class RecordingRunner(CudaGraphRunner):
    """A graph runner without CUDA: `record` keeps the function and its static buffers, and a
    replay recomputes into the recorded outputs, as a CUDA graph replay overwrites its own."""

    def record(self, fn, buffers):
        out = fn(*buffers)

        def replay():
            new = fn(*buffers)
            out.items.copy_(new.items)
            out.scores.copy_(new.scores)

        return replay, out


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = OneRecV2Config.from_preset("tiny", **overrides)
    model = OneRecV2(cfg).eval()
    rng = np.random.default_rng(seed)
    table = np.stack([rng.permutation(cfg.codebook_size)[:200] for _ in range(3)], 1).astype(np.int64)
    table = np.unique(table, axis=0)
    return model, table, SemanticIdIndex.build(table, cfg.codebook_size)


def histories(table, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, len(table), n).tolist() for n in lengths]


def graph_engine(monkeypatch, model, index, **config) -> Engine:
    monkeypatch.setattr(Engine, "uses_graphs", property(lambda self: True))
    engine = Engine(model, index, EngineConfig(**config))
    engine._graphs = RecordingRunner(engine._search)
    return engine


def test_length_buckets_double_from_the_smallest_up_to_the_context():
    assert length_buckets(3000) == (64, 128, 256, 512, 1024, 2048, 3000)
    assert length_buckets(50) == (50,)
    assert length_buckets(128) == (64, 128)


def test_bucketed_search_returns_the_unpadded_search_top_k():
    """Histories of 0..context_len items, padded into buckets in one batch, give each user the
    top-k of that user's own unpadded search (the reference kernels)."""
    model, table, index = tiny_model()
    lengths = [0, 1, 3, 17, 49, 50, 120]  # empty, short, a bucket's edge, the context, longer than it
    hist = histories(table, lengths)
    engine = Engine(model, index, EngineConfig(beam_size=16, k=10, history_buckets=(4, 16, 32)))
    assert engine.history_buckets == (4, 16, 32, 50)
    sids, mask, _ = encode_histories(hist, table, model.cfg.context_len)
    got = engine.recommend(sids, mask)
    for i, h in enumerate(hist):
        s, m, _ = encode_histories([h], table, model.cfg.context_len)
        want = beam_search(model, s, m, index, beam_size=16, k=10)
        assert torch.equal(got.items[i], want.items[0]), (lengths[i], got.items[i], want.items[0])
        torch.testing.assert_close(got.scores[i], want.scores[0], rtol=1e-4, atol=1e-4)
    assert engine.positions["real"] == int(mask.sum())
    assert engine.positions["padding"] == len(hist) * 50 - int(mask.sum())


def test_one_engine_serves_every_width_over_one_set_of_weights():
    model, table, index = tiny_model()
    engine = Engine(model, index, EngineConfig(beam_size=32, beam_sizes=(8, 32), k=32))
    sids, mask, _ = encode_histories(histories(table, [5, 9]), table, model.cfg.context_len)
    for beam, width in [(3, 8), (8, 8), (9, 32), (None, 32)]:
        got = engine.recommend(sids, mask, beam=beam)
        want = beam_search(model, sids, mask, index, beam_size=width, k=min(32, width))
        assert torch.equal(got.items, want.items), beam
    with pytest.raises(ValueError, match="wider than every served width"):
        engine.recommend(sids, mask, beam=33)
    # the serving view shares the model's tensors: no per-width copy of any weight
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    view = engine.model.blocks[0]
    assert view.cross_q.weight.data_ptr() in model_ptrs


def test_capture_fixes_the_graphs_and_new_shapes_add_none(monkeypatch):
    model, table, index = tiny_model()
    engine = graph_engine(monkeypatch, model, index, beam_size=16, beam_sizes=(4, 16), k=16,
                          batch_buckets=(1, 2, 4), history_buckets=(8, 32))
    report = engine.capture()
    expected = {(w, b, t, False) for w in (4, 16) for b in (1, 2, 4) for t in (8, 32, 50)}
    assert set(engine._graphs.graphs) == expected and report.graphs == len(expected) and not report.failed
    rng = np.random.default_rng(1)
    for _ in range(12):  # new lengths, widths and batch sizes: replays only
        n = int(rng.integers(1, 5))
        hist = histories(table, rng.integers(0, 80, n), seed=int(rng.integers(1000)))
        sids, mask, _ = encode_histories(hist, table, model.cfg.context_len)
        beam = int(rng.integers(1, 17))
        got = engine.recommend(sids, mask, beam=beam)
        want = beam_search(model, *encode_histories(hist, table, model.cfg.context_len)[:2], index,
                           beam_size=engine.width(beam), k=engine.width(beam))
        assert torch.equal(got.items, want.items)
    assert set(engine._graphs.graphs) == expected
    assert engine.eager_fallbacks == 0 and engine.captures_after_ready == 0
    # a batch beyond the largest bucket is answered eagerly, correctly, and counted
    hist = histories(table, [5] * 6, seed=7)
    sids, mask, _ = encode_histories(hist, table, model.cfg.context_len)
    got = engine.recommend(sids, mask, beam=16)
    assert torch.equal(got.items, beam_search(model, sids, mask, index, beam_size=16, k=16).items)
    assert engine.eager_fallbacks == 1 and set(engine._graphs.graphs) == expected


def test_batcher_fills_batches_while_the_previous_one_runs():
    """Closed-loop clients at twice the maximum batch: once the first batch runs, each next batch
    collects up to the maximum while the GPU (a 30 ms sleep here) is busy."""
    sizes, lock = [], threading.Lock()

    def run(users, k, beam):
        with lock:
            sizes.append(len(users))
        time.sleep(0.03)
        return [type("R", (), {"top": lambda self, k, u=u: u})() for u in users]

    async def main():
        batcher = DynamicBatcher(run, max_batch_users=16, max_wait_s=0.002)
        batcher.start()
        answered = []

        async def client(c):
            for i in range(8):
                result = await batcher.submit([(c, i)], 1, 8)
                answered.append(result[0])

        await asyncio.gather(*(client(c) for c in range(32)))
        await batcher.stop()
        return answered

    answered = asyncio.run(main())
    assert sorted(answered) == sorted((c, i) for c in range(32) for i in range(8))
    steady = sizes[2:]
    assert np.mean(steady) >= 0.75 * 16, sizes


def test_batcher_starts_the_next_batch_while_the_event_loop_is_busy():
    """The batch thread takes the next batch itself when a batch returns: a busy event loop (here
    blocked for 300 ms, as when it answers a batch's clients) does not keep the GPU idle."""
    starts = []

    def run(users, k, beam):
        starts.append(time.monotonic())
        time.sleep(0.05)
        return [type("R", (), {"top": lambda self, k, u=u: u})() for u in users]

    async def main():
        batcher = DynamicBatcher(run, max_batch_users=4)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([1, 2, 3, 4], 1, 8))
        second = asyncio.ensure_future(batcher.submit([5], 1, 8))
        await asyncio.sleep(0.01)  # both queued; the first batch is running
        blocked_from = time.monotonic()
        time.sleep(0.3)  # the event loop is busy: it cannot start anything
        blocked_until = time.monotonic()
        answers = await asyncio.gather(first, second)
        await batcher.stop()
        return answers, blocked_from, blocked_until

    answers, blocked_from, blocked_until = asyncio.run(main())
    assert answers == [[1, 2, 3, 4], [5]]
    assert len(starts) == 2 and blocked_from < starts[1] < blocked_until, (starts, blocked_from, blocked_until)


def test_batcher_answers_failures_and_refuses_after_stop():
    def run(users, k, beam):
        if beam == 13:
            raise RuntimeError("kernel failed")
        return [type("R", (), {"top": lambda self, k, u=u: u})() for u in users]

    async def main():
        batcher = DynamicBatcher(run, max_batch_users=8)
        with pytest.raises(BatcherStopped):
            await batcher.submit([1], 1, 8)
        batcher.start()
        failed, ok = await asyncio.gather(batcher.submit([1], 1, 13), batcher.submit([2], 1, 8),
                                          return_exceptions=True)
        await batcher.stop()
        with pytest.raises(BatcherStopped):
            await batcher.submit([3], 1, 8)
        return failed, ok

    failed, ok = asyncio.run(main())
    assert isinstance(failed, RuntimeError) and "kernel failed" in str(failed)
    assert ok == [2]
