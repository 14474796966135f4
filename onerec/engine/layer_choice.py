"""Per-layer bf16/FP8 choice, fixed at quantization time from a GPU timing of each layer's GEMM.

At one user FP8 does not always pay: on an H200 (2026-12-04) the 1b model's FP8 GEMMs at 512 rows
(1 user x beam 512) were 0.98-1.29x bf16 alone and 0.78-1.22x with their activation quantization
pass; from 3000 rows up 1.2-1.7x. `choose_layers` times each distinct GEMM the engine runs
(onerec/engine/convert.py) at one user's rows: `rows` (the beam width) for the decoder layers, the
context length + 1 for the context projection. bf16 is `F.linear`; FP8 is the engine's own
`FP8RowwiseMethod` (`scaled_mm_rowwise`), fed FP8 rows where the kernel before the layer emits
them (`convert.FUSED_INPUT`) and bf16 rows, quantized by its `quantize_rows` pass, elsewhere.
A layer stays FP8 only where FP8 is at least `min_speedup` times faster. w1 and w3 of one FFN are
one GEMM (the engine fuses them), so they get one choice.

The choice is made once, recorded in recipe.json (timings, GPU, rows) and the same for every
batch size, so a request's numerics never depend on the load. It is the recipe option
`layer_choice="timed"` of fp8_dynamic (onerec/quant/recipes.py), which needs a CUDA GPU: the
measurement is the point, so without one it is refused, never guessed. Layers outside the
engine's row-wise GEMMs (MoE experts) keep the recipe's selection.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from onerec.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_ROWS = 512  # 1 user x beam 512: the decoder GEMMs' rows at one user
DEFAULT_MIN_SPEEDUP = 1.0
# (K, N, rows, fused_input) -> (bf16 ms, FP8 ms) of one GEMM y[rows, N] = x[rows, K] W^T
Timer = Callable[[int, int, int, bool], tuple[float, float]]

_BLOCK_LINEAR = re.compile(r"blocks\.(\d+)\.(cross_q|cross_o|self_qkv|self_o|ffn\.w1|ffn\.w2|ffn\.w3)")


@dataclass(frozen=True)
class Gemm:
    """One GEMM of the engine: the model layers it computes (w1 and w3 of an FFN together)."""

    layers: tuple[str, ...]
    K: int
    N: int
    rows: int
    fused_input: bool


def fused_input(name: str) -> bool:
    from onerec.engine.convert import FUSED_INPUT

    return any(name == s or name.endswith("." + s) for s in FUSED_INPUT)


def engine_gemms(model, names, rows: int = DEFAULT_ROWS) -> list[Gemm]:
    """The engine's row-wise GEMMs among the layers `names` of `model` (a OneRecV2)."""
    from onerec.model import SwiGLU

    names = set(names)
    gemms = []
    for name in sorted(names):
        layer = model.get_submodule(name)
        K, N = layer.in_features, layer.out_features
        if name == "context.proj":
            gemms.append(Gemm((name,), K, N, model.cfg.context_len + 1, fused_input(name)))
            continue
        match = _BLOCK_LINEAR.fullmatch(name)
        if match is None:
            continue
        block, which = int(match[1]), match[2]
        if which.startswith("ffn.") and not isinstance(model.blocks[block].ffn, SwiGLU):
            continue
        if which == "ffn.w3" and f"blocks.{block}.ffn.w1" in names:
            continue  # timed with w1
        if which == "ffn.w1" and f"blocks.{block}.ffn.w3" in names:
            w3 = f"blocks.{block}.ffn.w3"
            gemms.append(Gemm((name, w3), K, N + model.get_submodule(w3).out_features, rows, fused_input(name)))
            continue
        gemms.append(Gemm((name,), K, N, rows, fused_input(name)))
    return gemms


class CudaGemmTimer:
    """Times one GEMM shape on a CUDA GPU as the engine runs it: median of CUDA-graph replays
    (triton.testing.do_bench_cudagraph; the engine replays its requests as graphs too)."""

    method = "median of CUDA-graph replays (triton.testing.do_bench_cudagraph), random bf16 data"

    def __init__(self, rep_ms: int = 100):
        import torch

        if not torch.cuda.is_available():
            raise UserError("layer_choice=timed times each layer on a CUDA GPU and none is visible here; "
                            "quantize on the serving GPU or use layer_choice=all")
        self.device = torch.device("cuda")
        self.device_name = torch.cuda.get_device_name(self.device)
        self.rep_ms = rep_ms

    def _median_ms(self, fn) -> float:
        import triton.testing

        return triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, return_mode="median")

    def __call__(self, K: int, N: int, rows: int, fused_input: bool) -> tuple[float, float]:
        import torch
        from torch import nn

        from onerec import kernels
        from onerec.engine.linear import FP8RowwiseMethod, ServingLinear, UnquantizedMethod
        from onerec.kernels import Kernel

        source = nn.Linear(K, N, bias=False, device=self.device, dtype=torch.bfloat16)
        nn.init.normal_(source.weight, std=K**-0.5)
        bf16 = ServingLinear(source, UnquantizedMethod(), torch.bfloat16)
        fp8 = ServingLinear(source, FP8RowwiseMethod(Kernel.TRITON), torch.bfloat16)
        x = torch.randn(rows, K, device=self.device, dtype=torch.bfloat16)
        x_fp8 = kernels.quantize_rows(x, kernel=Kernel.TRITON) if fused_input else x
        with torch.no_grad():
            return self._median_ms(lambda: bf16(x)), self._median_ms(lambda: fp8(x_fp8))


def default_timer() -> Timer:
    return CudaGemmTimer()


def choose_layers(model, names, rows: int = DEFAULT_ROWS, min_speedup: float = DEFAULT_MIN_SPEEDUP,
                  timer: Timer | None = None) -> dict:
    """Time the engine's GEMMs among `names` and choose bf16 or FP8 for each layer (see module doc).

    Returns {"rows", "context_rows", "min_speedup", "device", "timing", "layers": {name: {shape,
    rows, fused_input, gemm, bf16_ms, fp8_ms, speedup, choice}}} (recipe.json's "layer_choice").
    """
    timer = timer or default_timer()
    gemms = engine_gemms(model, names, rows)
    times: dict[tuple, tuple[float, float]] = {}
    for g in gemms:
        key = (g.K, g.N, g.rows, g.fused_input)
        if key not in times:
            times[key] = timer(*key)
            log.info("timed GEMM K=%d N=%d at %d rows (%s input): bf16 %.4f ms, FP8 %.4f ms (%d of at most %d shapes)",
                     g.K, g.N, g.rows, "fused" if g.fused_input else "bf16", *times[key], len(times), len(gemms))
    layers = {}
    for g in gemms:
        bf16_ms, fp8_ms = times[(g.K, g.N, g.rows, g.fused_input)]
        speedup = bf16_ms / fp8_ms
        entry = {"gemm": "|".join(g.layers), "shape": [g.N, g.K], "rows": g.rows, "fused_input": g.fused_input,
                 "bf16_ms": bf16_ms, "fp8_ms": fp8_ms, "speedup": speedup,
                 "choice": "fp8" if speedup >= min_speedup else "bf16"}
        layers.update({name: entry for name in g.layers})
    kept = sum(e["choice"] == "bf16" for e in layers.values())
    log.info("timed layer choice: %d of %d layers stay bf16 (FP8 under %gx at one user)", kept, len(layers), min_speedup)
    return {
        "rows": rows, "context_rows": model.cfg.context_len + 1, "min_speedup": min_speedup,
        "device": getattr(timer, "device_name", "unknown"), "timing": getattr(timer, "method", "given timer"),
        "layers": layers,
    }


def excluded_reason(entry: dict, min_speedup: float) -> str:
    """Why a timed layer stays bf16 (QuantizationReport.excluded, recipe.json)."""
    if entry["speedup"] < 1.0:
        return f"FP8 slower at {entry['rows']} rows: {entry['speedup']:.2f}x"
    return f"FP8 under {min_speedup:g}x at {entry['rows']} rows: {entry['speedup']:.2f}x"
