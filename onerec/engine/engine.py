"""The serving backend of OneRec-V2: the model's own beam search, with faster kernels per module.

`Engine(model, index, config).recommend(...)` runs `onerec.generate.beam_search` (context once
per user, then 3 KV-cached `OneRecV2.decode_step`s) on a serving view of the model: a second
module tree over the same weights (nothing is copied; the caller's model is left as it is) in
which the engine sets, per module,
- the kernel of its ops (`kernel="triton"` on CUDA, the torch references elsewhere: onerec/kernels):
  the residual add of each sublayer fused into the next RMSNorm, SiLU*mul over one w1|w3 GEMM,
  the cached self-attention over the beams' ancestors read in place;
- the method of each Linear (onerec/engine/linear.py): bf16, or FP8 with per-channel weights and
  per-token activations, where the norm or SiLU*mul kernel before the GEMM emits the FP8 input
  and its scales in the same pass;
and, on CUDA, the whole request (context + 3 steps + top-k) has static shapes for a given batch
bucket and history length, so the same search function is captured once as a CUDA graph and
replayed (`CudaGraphRunner`, the way gpt-fast wraps its decode step with torch.compile).

The same code runs a bf16 model (every optimisation but FP8), a bf16 model quantized on the fly
(`EngineConfig(fp8=True)`) or a quantized model whose Linear layers are `FP8Linear` (taken as
they are). On CPU it runs the torch references without graphs: the tests compare that with the
plain search. MoE blocks run the model's MoE module by default; its routing syncs with the host,
so such a model runs without graphs. `EngineConfig(moe_kernel="triton")` (opt-in until measured on
a GPU) stacks each MoE's experts once and runs the fused op `kernels.moe` instead: routing and
grouped expert GEMMs without host syncs, so the request is captured as a graph again
(`moe_kernel="torch"`: the fused op's PyTorch reference, for tests). Cross-attention over the
context stays bf16 SDPA.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
from dataclasses import dataclass

import torch

from onerec import kernels
from onerec.engine.linear import ModuleMethod, fuse, serving_linear
from onerec.generate import Recommendations, beam_search
from onerec.model import MoE, OneRecV2, SwiGLU
from onerec.quant.fp8 import FP8Linear
from onerec.semantic_ids import SemanticIdIndex

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    beam_size: int = 512
    k: int = 10
    # FP8 GEMMs: None = where the model already has FP8Linear layers; True = also quantize the
    # model's bf16 Linear layers (per-channel weights, per-token activations); False = bf16 only
    # (a model with FP8Linear layers keeps them: their weights exist only in FP8).
    fp8: bool | None = None
    quantize_context: bool = True  # with fp8=True: the context projection too
    cuda_graphs: bool = True  # CUDA only
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    kernel: str | None = None  # "torch" | "triton" (onerec.kernels); None: "triton" on CUDA, else "torch"
    # None: the model's MoE module; "torch" | "triton": the fused MoE op (kernels.moe) with that kernel
    moe_kernel: str | None = None


# Layers (name suffixes) whose FP8 input serving_model has the kernel before them emit in the same
# pass: the RMSNorm before context.proj, cross_q, self_qkv and w1|w3, the SiLU*mul before w2. The
# others (cross_o, self_o) quantize their input in a quantize_rows pass of their own. The timed
# per-layer choice (onerec/engine/layer_choice.py) times each GEMM with or without that pass.
FUSED_INPUT = frozenset({"context.proj", "cross_q", "self_qkv", "ffn.w1", "ffn.w3", "ffn.w2"})


def shared_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers are the original tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def serving_model(model: OneRecV2, fp8: bool, quantize_context: bool, kernel: str,
                  moe_kernel: str | None = None) -> OneRecV2:
    """The serving view of `model` (see module doc); heads and norms stay in high precision."""
    view = shared_weights_copy(model).eval()
    dtype = model.token_embedding.weight.dtype

    def linear(module, quantize=fp8):
        return serving_linear(module, quantize, kernel, dtype)

    for module in view.modules():
        if hasattr(module, "kernel") and not isinstance(module, MoE):
            module.kernel = kernel
    ctx = view.context
    ctx.proj = linear(ctx.proj, fp8 and quantize_context)
    ctx.input_norm.quantize_output = ctx.proj.takes_fp8
    for block in view.blocks:
        for name in ("cross_q", "cross_o", "self_qkv", "self_o"):
            setattr(block, name, linear(getattr(block, name)))
        block.cross_norm.quantize_output = block.cross_q.takes_fp8
        block.self_norm.quantize_output = block.self_qkv.takes_fp8
        ffn = block.ffn
        if isinstance(ffn, SwiGLU):
            w13, w2 = fuse(linear(ffn.w1), linear(ffn.w3)), linear(ffn.w2)
            if w13 is not None and not isinstance(w2.method, ModuleMethod):
                ffn.w13, ffn.w2, ffn.w1, ffn.w3 = w13, w2, None, None
                ffn.quantize_hidden = w2.takes_fp8
                block.ffn_norm.quantize_output = w13.takes_fp8
            else:  # layers that cannot share a GEMM: the FFN as it is, on bf16 input
                ffn.kernel = "torch"
        elif isinstance(ffn, MoE) and moe_kernel is not None:
            # fp8: bf16 experts quantized here in 128x128 blocks (the fp8_block layout); FP8Linear
            # experts are taken as they are. None: a layout the grouped GEMM cannot take (module stays).
            ffn.weights = kernels.MoEWeights.from_module(ffn, fp8=True if fp8 else None)
            ffn.kernel = moe_kernel if ffn.weights is not None else "torch"
    return view


class CudaGraphRunner:
    """`fn(*inputs, **static)` captured as a CUDA graph once per key (the inputs' shapes and the
    static arguments), then replayed: new inputs are copied into the captured ones, and the
    returned outputs are the graph's own buffers (overwritten by the next replay)."""

    def __init__(self, fn):
        self.fn = fn
        self.graphs: dict = {}
        self.pool = None

    def __call__(self, key, *inputs, **static):
        if key not in self.graphs:
            log.info("capturing a CUDA graph for %s", key)
            self.graphs[key] = self._capture(functools.partial(self.fn, **static), inputs)
        graph, buffers, out = self.graphs[key]
        for buf, new in zip(buffers, inputs, strict=True):
            if buf is not None:
                buf.copy_(new)
        graph.replay()
        return out

    def _capture(self, fn, inputs):
        buffers = tuple(None if t is None else t.clone() for t in inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles Triton kernels, creates cuBLAS handles and workspaces
                fn(*buffers)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(*buffers)
        return graph, buffers, out


class Engine:
    """Fast constrained beam search for one model + semantic-id index (see module doc)."""

    def __init__(self, model: OneRecV2, index: SemanticIdIndex, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        if not 1 <= config.k <= config.beam_size:
            raise ValueError(f"need 1 <= k <= beam_size, got k={config.k}, beam_size={config.beam_size}")
        self.cfg = cfg = model.cfg
        self.device = model.token_embedding.weight.device
        self.index = index.to(self.device)
        self.kernel = config.kernel or ("triton" if self.device.type == "cuda" else "torch")
        if self.kernel not in kernels.KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; known: {', '.join(kernels.KERNELS)}")
        if config.moe_kernel not in (None, *kernels.KERNELS):
            raise ValueError(f"unknown moe_kernel {config.moe_kernel!r}; known: {', '.join(kernels.KERNELS)}")
        self.model = serving_model(model.eval(), bool(config.fp8), config.quantize_context, self.kernel,
                                   config.moe_kernel)
        self.fp8 = any(  # does any block GEMM run in FP8 (natively or through an FP8Linear's own forward)?
            m.takes_fp8 or isinstance(getattr(m, "source", None), FP8Linear)
            for b in self.model.blocks for m in (b.cross_q, b.cross_o, b.self_qkv, b.self_o)
        )
        # beams after each step: static for a given index, so every step has a static shape
        self.beams = list(itertools.accumulate(
            index.max_children[:cfg.n_levels], lambda K, m: min(config.beam_size, K * m), initial=1))[1:]
        # MoE blocks whose routing syncs with the host (the module, or the fused op's reference)
        self.has_moe = any(isinstance(b.ffn, MoE) and b.ffn.kernel != "triton" for b in self.model.blocks)
        self._graphs = CudaGraphRunner(self._search)

    def bucket(self, batch: int) -> int:
        return next((b for b in self.config.batch_buckets if b >= batch), batch)

    @torch.no_grad()
    def recommend(self, history_sids: torch.Tensor, history_mask: torch.Tensor,
                  profile: torch.Tensor | None = None) -> Recommendations:
        """Top-k items [B, k] and scores for B users (same contract as generate.beam_search)."""
        padded = not bool(history_mask.all())  # decided on the inputs' device, before any copy
        history_sids = history_sids.to(self.device)
        history_mask = history_mask.to(self.device)
        if profile is not None:
            profile = profile.to(self.device)
        if not (self.config.cuda_graphs and self.device.type == "cuda" and not self.has_moe):
            return self._search(history_sids, history_mask, profile, padded=padded)
        B, T = history_mask.shape
        Bb = self.bucket(B)
        if Bb > B:  # pad with copies of the first user: keeps the batch's masking unchanged
            fill = lambda t: None if t is None else torch.cat([t, t[:1].expand(Bb - B, *t.shape[1:])])  # noqa: E731
            history_sids, history_mask, profile = fill(history_sids), fill(history_mask), fill(profile)
        key = (Bb, T, padded, profile is not None)
        out = self._graphs(key, history_sids, history_mask, profile, padded=padded)
        return Recommendations(out.items[:B].clone(), out.scores[:B].clone())

    def _search(self, history_sids, history_mask, profile, padded: bool = True) -> Recommendations:
        return beam_search(self.model, history_sids, history_mask, self.index, profile,
                           beam_size=self.config.beam_size, k=self.config.k, padded=padded)
