"""The GPU kernel check script (bench/gpu_kernels_check.py) end to end on CPU: its --dry-run-cpu mode
runs every item through Triton's interpreter at tiny shapes, so a GPU session never spends its
time on a broken script. Timings here mean nothing; the checks and the JSON layout do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from triton_interpreter import requires_triton

ROOT = Path(__file__).resolve().parents[2]


@requires_triton
def test_kernel_check_script_runs_every_item_on_cpu(tmp_path):
    out = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, "bench/gpu_kernels_check.py", "--dry-run-cpu", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    errors = {name: r["error"] for name, r in results.items() if isinstance(r, dict) and "error" in r}
    assert not errors
    assert results["moe_check_16"]["passed"]
    assert results["moe_quantize_blocks_check"] == {"scales_equal": True, "fp8_mismatches": 0}
    gemms = {k: v for k, v in results["gemm_shapes"].items() if k != "rows"}
    # every Linear of a dense block and the context projection, w1|w3 fused, at each row count
    assert {k.split("_")[0] for k in gemms} == {"context.proj", "cross", "self", "ffn.w13", "ffn.w2"}
    assert all(v["bf16_ms"] > 0 and v["fp8_with_quantize_ms"] > 0 for v in gemms.values())
    assert "gemm_shapes (FP8 speedup" in result.stdout
