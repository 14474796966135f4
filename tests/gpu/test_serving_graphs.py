"""The served shapes on CUDA: every graph captured before serving, then requests of new history
lengths, widths and batch sizes only replay them, with the eager engine's answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("fp8", [False, True])
def test_captured_shapes_serve_mixed_requests_without_new_graphs(fp8):
    from test_kernels import random_cuda_setup

    from onerec.engine.engine import Engine, EngineConfig

    model, index, _, _ = random_cuda_setup("small", std=0.1, n_items=3000, history=150, padded=0)
    config = EngineConfig(beam_size=64, beam_sizes=(16, 64), k=64, fp8=fp8, batch_buckets=(1, 2, 4, 8),
                          history_buckets=(32, 128))
    engine = Engine(model, index, config)
    report = engine.capture()
    assert report.graphs == 2 * 4 * 3 and not report.failed and report.memory_bytes > 0
    eager = Engine(model, index, EngineConfig(**{**config.__dict__, "cuda_graphs": False}))
    keys = set(engine._graphs.graphs)
    rng = np.random.default_rng(0)
    n_items = int(index.leaf_item.max()) + 1
    for _ in range(10):
        B = int(rng.integers(1, 9))
        lengths = rng.integers(0, 201, B)
        T = max(1, int(lengths.max()))
        sids = torch.from_numpy(rng.integers(0, n_items, (B, T, 3)) % model.cfg.codebook_size)
        mask = torch.from_numpy(np.arange(T)[None, :] >= T - lengths[:, None])
        beam = int(rng.integers(1, 65))
        got, want = engine.recommend(sids, mask, beam=beam), eager.recommend(sids, mask, beam=beam)
        assert torch.equal(got.items, want.items), (B, T, beam)
    assert set(engine._graphs.graphs) == keys
    assert engine.eager_fallbacks == 0 and engine.captures_after_ready == 0
