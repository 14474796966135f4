"""The engine's Triton kernels on CPU, in Triton's interpreter (TRITON_INTERPRET=1): the serving
view the engine converts the model into (fused norms, one w1|w3 GEMM, the cached self-attention
kernel, FP8 inputs emitted by the kernels) gives the top-k of the same view on the torch
references. CUDA graphs and the kernels' speed need a GPU (tests/gpu); this checks the plumbing
and the numerics of the Triton path on every CI run. The interpreter is chosen when the kernels
are defined, so the check runs in a fresh interpreter process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import json, os
import numpy as np, torch
from onerec.engine.engine import Engine, EngineConfig
from onerec.evaluate import topk_overlap
from onerec.model import OneRecV2, OneRecV2Config
from onerec.semantic_ids import SemanticIdIndex

torch.manual_seed(0)
cfg = OneRecV2Config.from_preset("tiny")
model = OneRecV2(cfg).eval().to(torch.bfloat16)
rng = np.random.default_rng(0)
table = np.unique(np.stack([rng.permutation(cfg.codebook_size)[:200] for _ in range(3)], 1).astype(np.int64), axis=0)
index = SemanticIdIndex.build(table, cfg.codebook_size)
sids = torch.from_numpy(table[rng.integers(0, len(table), (3, 20))])
mask = torch.ones(3, 20, dtype=torch.bool)
mask[0, :5] = False  # a shorter history, left-padded
out = {}
for fp8 in (False, True):
    runs = {}
    for kernel in ("triton", "torch"):
        engine = Engine(model, index, EngineConfig(beam_size=16, k=5, kernel=kernel, cuda_graphs=False, fp8=fp8))
        runs[kernel] = engine.recommend(sids, mask)
        if kernel == "triton":
            out["modules"] = sorted({type(m).__name__ for m in engine.model.modules() if type(m).__name__.startswith("Serving")})
    out["fp8" if fp8 else "bf16"] = topk_overlap(runs["triton"].items.numpy(), runs["torch"].items.numpy(), 5)
print(json.dumps(out))
"""


@pytest.mark.timeout(600)
def test_the_triton_path_in_the_interpreter_gives_the_torch_references_top_k():
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"ServingRMSNorm", "ServingSwiGLU", "ServingCachedSelfAttention"} <= set(result["modules"]), result
    assert result["bf16"] >= 0.9 and result["fp8"] >= 0.9, result
