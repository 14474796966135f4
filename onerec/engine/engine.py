"""The serving backend of OneRec-V2: the model's own beam search, with the engine's modules swapped in.

`Engine(model, index, config).recommend(...)` runs `onerec.generate.beam_search` (context once
per user, then 3 KV-cached `OneRecV2.decode_step`s) on a serving view of the model, converted once
per Engine (`serving_model`, onerec/engine/convert.py): a second module tree over the same
parameters (the caller's model is left as it is) with the engine's modules swapped in:
- its kernels (`Kernel.TRITON` on CUDA, the torch references elsewhere: onerec/kernels): the
  residual add of each sublayer fused into the next RMSNorm, SiLU*mul over one w1|w3 GEMM, the
  cached self-attention over the beams' ancestors read in place (onerec/engine/layers.py);
- the method of each Linear (onerec/engine/linear.py): bf16, or FP8 with per-channel weights and
  per-token activations, where the norm or SiLU*mul kernel before the GEMM emits the FP8 input
  and its scales in the same pass.
The conversion makes new tensors only for layouts a kernel needs: w1|w3 concatenated (one more
copy of the dense FFNs' gate and up weights: 314M values for the 1b preset, 0.63 GB in bf16 and
0.31 GB in FP8), FP8 weights when it quantizes bf16 ones (`EngineConfig(fp8=True)`), stacked MoE
experts. One Engine, so one such copy, serves every beam width of `EngineConfig.beam_sizes` and
every batch and history bucket.

On CUDA, the whole request (context + 3 steps + top-k) has static shapes for a given beam
width, batch bucket and history bucket, so the same search function is captured once per shape
as a CUDA graph and replayed (`CudaGraphRunner`, the way gpt-fast wraps its decode step with
torch.compile). The shapes are a fixed set, as LLM servers fix their graph batch sizes: a batch is
padded up to a batch bucket and its histories up to a history bucket (masked positions, left
of the newest item, so recency positions do not move); `Engine.capture()` records every graph
before a server says ready, and after that a shape outside the set runs eagerly and is counted.

The same code runs a bf16 model (every optimisation but FP8), a bf16 model quantized on the fly
(`EngineConfig(fp8=True)`) or a quantized model whose Linear layers are `FP8Linear` (taken as
they are). On CPU it runs the torch references without graphs: the tests compare that with the
plain search. MoE blocks run the model's MoE module by default; its routing syncs with the host,
so such a model runs without graphs. `EngineConfig(moe_kernel=Kernel.TRITON)` (opt-in until
measured on a GPU) stacks each MoE's experts once and runs the fused op `kernels.moe` instead:
routing and grouped expert GEMMs without host syncs, so the request is captured as a graph again
(`Kernel.TORCH`: the fused op's PyTorch reference, for tests). Cross-attention over the
context stays bf16 SDPA.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from onerec.engine.convert import serving_model
from onerec.engine.layers import FusedMoE
from onerec.engine.linear import ModuleMethod
from onerec.generate import Recommendations, beam_search
from onerec.kernels import Kernel
from onerec.model import MoE, OneRecV2
from onerec.quant.fp8 import FP8Linear
from onerec.semantic_ids import SemanticIdIndex

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    beam_size: int = 512  # the width of a search that names none
    # every width served (beam_size included): one set of weights, graphs per width
    beam_sizes: tuple[int, ...] = ()
    k: int = 10  # items returned per user (at most the search's width)
    # FP8 GEMMs: None = where the model already has FP8Linear layers; True = also quantize the
    # model's bf16 Linear layers (per-channel weights, per-token activations); False = bf16 only
    # (a model with FP8Linear layers keeps them: their weights exist only in FP8).
    fp8: bool | None = None
    quantize_context: bool = True  # with fp8=True: the context projection too
    cuda_graphs: bool = True  # CUDA only
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # history lengths are padded up to one of these (masked); None: length_buckets(context_len)
    history_buckets: tuple[int, ...] | None = None
    kernel: Kernel | None = None  # None: Kernel.TRITON on CUDA, else Kernel.TORCH
    # None: the model's MoE module; a Kernel: the fused MoE op (kernels.moe) with that kernel
    moe_kernel: Kernel | None = None

    def __post_init__(self) -> None:
        # a name from a CLI or config ("torch" | "triton") becomes the Kernel here, once
        if self.kernel is not None:
            self.kernel = Kernel.parse(self.kernel, "kernel")
        if self.moe_kernel is not None:
            self.moe_kernel = Kernel.parse(self.moe_kernel, "moe_kernel")


def length_buckets(context_len: int, smallest: int = 64, ratio: int = 2) -> tuple[int, ...]:
    """History lengths a batch is padded up to: `smallest`, then x`ratio` steps, then context_len.

    Padding costs only cross-attention and the context projection over masked positions; at the
    1b shapes on the H200 that is what bench/results/engine_history_buckets_nvidia_h200.json
    measures per bucket (docs/serving.md: sizing the buckets).
    """
    sizes, n = [], smallest
    while n < context_len:
        sizes.append(n)
        n *= ratio
    return (*sizes, context_len)


@dataclass
class CaptureReport:
    """What `Engine.capture()` did: graphs captured, seconds, GPU memory the graphs' pool holds."""

    graphs: int
    seconds: float
    memory_bytes: int
    failed: list = field(default_factory=list)  # keys whose capture failed (served eagerly)

    def to_dict(self) -> dict:
        return {"graphs": self.graphs, "seconds": round(self.seconds, 2),
                "memory_gib": round(self.memory_bytes / 2**30, 3), "failed": [list(k) for k in self.failed]}


class CudaGraphRunner:
    """`fn(*inputs, **static)` captured as a CUDA graph once per key (the inputs' shapes and the
    static arguments), then replayed: new inputs are copied into the captured ones, and the
    returned outputs are the graph's own buffers (overwritten by the next replay). Once `frozen`,
    a key without a graph runs `fn` eagerly and is counted (`eager_fallbacks`): a server captures
    everything before it is ready and never captures while requests wait."""

    def __init__(self, fn):
        self.fn = fn
        self.graphs: dict = {}
        self.pool = None
        self.frozen = False
        self.eager_fallbacks = 0
        self.captures_after_freeze = 0  # stays 0 in a server: everything is captured before ready

    def __call__(self, key, *inputs, **static):
        if key not in self.graphs:
            if self.frozen:
                self.eager_fallbacks += 1
                return self.fn(*inputs, **static)
            self.capture(key, *inputs, **static)
        replay, buffers, out = self.graphs[key]
        for buf, new in zip(buffers, inputs, strict=True):
            if buf is not None:
                buf.copy_(new)
        replay()
        return out

    def capture(self, key, *inputs, **static) -> None:
        log.debug("capturing a CUDA graph for %s", key)
        buffers = tuple(None if t is None else t.clone() for t in inputs)
        replay, out = self.record(functools.partial(self.fn, **static), buffers)
        self.graphs[key] = (replay, buffers, out)
        self.captures_after_freeze += self.frozen

    def record(self, fn, buffers) -> tuple:
        """(replay, outputs): fn on `buffers` captured as a CUDA graph."""
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
        return graph.replay, out


class Engine:
    """Fast constrained beam search for one model + semantic-id index (see module doc).

    One serving view of the weights serves every width of `config.beam_sizes`; a batch is padded
    up to a batch bucket (copies of its first user) and its histories up to a history bucket
    (masked positions), so the shapes a request can meet are a fixed set: `capture()` records a
    graph for each before serving, and `recommend` only replays them.
    """

    def __init__(self, model: OneRecV2, index: SemanticIdIndex, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.widths = tuple(sorted({config.beam_size, *config.beam_sizes}))
        if not (1 <= config.k and self.widths[0] >= 1):
            raise ValueError(f"need k >= 1 and beam widths >= 1, got k={config.k}, widths={self.widths}")
        if config.k > config.beam_size:
            raise ValueError(f"need 1 <= k <= beam_size, got k={config.k}, beam_size={config.beam_size}")
        self.cfg = cfg = model.cfg
        self.history_buckets = tuple(sorted(set(config.history_buckets or length_buckets(cfg.context_len))))
        if self.history_buckets[0] < 1 or self.history_buckets[-1] > cfg.context_len:
            raise ValueError(f"history buckets must lie in 1..context_len={cfg.context_len}, got {self.history_buckets}")
        if self.history_buckets[-1] != cfg.context_len:
            self.history_buckets = (*self.history_buckets, cfg.context_len)
        self.device = model.token_embedding.weight.device
        self.index = index.to(self.device)
        self.kernel = config.kernel or (Kernel.TRITON if self.device.type == "cuda" else Kernel.TORCH)
        self.model = serving_model(model.eval(), bool(config.fp8), config.quantize_context, self.kernel,
                                   config.moe_kernel)
        self.fp8 = any(  # does any block GEMM run in FP8 (natively or through an FP8Linear's own forward)?
            m.takes_fp8 or (isinstance(m.method, ModuleMethod) and isinstance(m.source, FP8Linear))
            for b in self.model.blocks for m in (b.cross_q, b.cross_o, b.self_qkv, b.self_o)
        )
        self.beams = self.beams_per_step(config.beam_size)
        # MoE blocks whose routing syncs with the host (the module, or the fused op's reference)
        self.has_moe = any(isinstance(b.ffn, MoE) or (isinstance(b.ffn, FusedMoE) and b.ffn.kernel is not Kernel.TRITON)
                           for b in self.model.blocks)
        self.profile_width = len(cfg.profile_columns) if cfg.profile_columns else 0
        self._graphs = CudaGraphRunner(self._search)
        # history positions of the users served (real) and added by the buckets (padding)
        self.positions = {"real": 0, "padding": 0}

    @property
    def uses_graphs(self) -> bool:
        return self.config.cuda_graphs and self.device.type == "cuda" and not self.has_moe

    @property
    def eager_fallbacks(self) -> int:
        return self._graphs.eager_fallbacks

    @property
    def captures_after_ready(self) -> int:
        return self._graphs.captures_after_freeze

    @property
    def graph_count(self) -> int:
        return len(self._graphs.graphs)

    def beams_per_step(self, beam: int) -> list[int]:
        """Beams after each step: static for a given index and width, so every step has a static shape."""
        return list(itertools.accumulate(
            self.index.max_children[:self.cfg.n_levels], lambda K, m: min(beam, K * m), initial=1))[1:]

    def bucket(self, batch: int) -> int:
        return next((b for b in self.config.batch_buckets if b >= batch), batch)

    def history_bucket(self, length: int) -> int:
        return next(b for b in self.history_buckets if b >= length)

    def width(self, beam: int | None) -> int:
        """The served width for a requested beam: the smallest served width >= beam."""
        if beam is None:
            return self.config.beam_size
        for w in self.widths:
            if w >= beam:
                return w
        raise ValueError(f"beam {beam} is wider than every served width {list(self.widths)}")

    def capture(self, batch_sizes: tuple[int, ...] | None = None) -> CaptureReport:
        """Capture the graph of every (width, batch bucket, history bucket) up to `batch_sizes`'s
        largest bucket (default: all), largest first so smaller graphs reuse the pool's blocks;
        then freeze: from here on a shape without a graph runs eagerly and is counted."""
        t0 = time.perf_counter()
        if not self.uses_graphs:
            self._graphs.frozen = True
            return CaptureReport(0, time.perf_counter() - t0, 0)
        buckets = [b for b in self.config.batch_buckets if b <= max(batch_sizes or self.config.batch_buckets)]
        before = self._reserved_memory()
        failed = []
        shapes = sorted(itertools.product(self.widths, buckets, self.history_buckets), key=lambda s: -s[0] * s[1] * s[2])
        for width, batch, length in shapes:
            sids = torch.zeros(batch, length, self.cfg.n_levels, dtype=torch.long, device=self.device)
            mask = torch.ones(batch, length, dtype=torch.bool, device=self.device)
            profile = (torch.zeros(batch, self.profile_width, device=self.device)
                       if self.profile_width else None)
            key = (width, batch, length, profile is not None)
            try:
                self._graphs.capture(key, sids, mask, profile, beam=width)
            except torch.OutOfMemoryError:
                log.warning("no memory to capture %s: that shape will run eagerly", key)
                failed.append(key)
                torch.cuda.empty_cache()
        self._graphs.frozen = True
        report = CaptureReport(self.graph_count, time.perf_counter() - t0, self._reserved_memory() - before, failed)
        log.info("captured %d CUDA graphs (widths %s, batches %s, histories %s) in %.1f s; they hold %.2f GiB",
                 report.graphs, list(self.widths), buckets, list(self.history_buckets), report.seconds,
                 report.memory_bytes / 2**30)
        return report

    def _reserved_memory(self) -> int:
        """GPU memory reserved by torch, cached free blocks returned first (so a capture's growth shows)."""
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(self.device)

    @torch.no_grad()
    def recommend(self, history_sids: torch.Tensor, history_mask: torch.Tensor,
                  profile: torch.Tensor | None = None, beam: int | None = None) -> Recommendations:
        """Top-min(k, width) items [B, .] and scores for B users (same contract as generate.beam_search),
        searched with the served width for `beam` (default: config.beam_size)."""
        width = self.width(beam)
        B, T = history_mask.shape
        Tb = self.history_bucket(T)
        # counted where the mask is on the host (serving); a device mask would cost a sync
        real = int(history_mask.sum()) if history_mask.device.type == "cpu" else B * T
        self.positions["real"] += real
        history_sids = history_sids.to(self.device)
        history_mask = history_mask.to(self.device)
        if profile is not None:
            profile = profile.to(self.device)
        if Tb > T:  # left-pad (histories are newest last): masked positions, recency unchanged
            history_sids = torch.nn.functional.pad(history_sids, (0, 0, Tb - T, 0))
            history_mask = torch.nn.functional.pad(history_mask, (Tb - T, 0))
        if not self.uses_graphs:
            self.positions["padding"] += B * Tb - real
            return self._search(history_sids, history_mask, profile, padded=True, beam=width)
        Bb = self.bucket(B)
        self.positions["padding"] += Bb * Tb - real
        if Bb > B:  # pad with copies of the first user
            fill = lambda t: None if t is None else torch.cat([t, t[:1].expand(Bb - B, *t.shape[1:])])  # noqa: E731
            history_sids, history_mask, profile = fill(history_sids), fill(history_mask), fill(profile)
        key = (width, Bb, Tb, profile is not None)
        out = self._graphs(key, history_sids, history_mask, profile, padded=True, beam=width)
        return Recommendations(out.items[:B].clone(), out.scores[:B].clone())

    def _search(self, history_sids, history_mask, profile, padded: bool = True, beam: int | None = None) -> Recommendations:
        beam = beam or self.config.beam_size
        return beam_search(self.model, history_sids, history_mask, self.index, profile,
                           beam_size=beam, k=min(self.config.k, beam), padded=padded)
