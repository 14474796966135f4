"""The torchao float8 baseline: Float8DynamicActivationFloat8WeightConfig(PerRow) on the plain model's
Linear layers (not the heads) + torch.compile of each block's decoding step; and a check of its
teacher-forced logits against bf16 and against the quant module's FP8Linear.
"""

from __future__ import annotations

from bench.models import build_model, random_index, random_requests


def torchao_model(model):
    """torchao float8 dynamic activations x float8 weights, per-row scales, blocks compiled."""
    import copy

    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    qmodel = copy.deepcopy(model)
    # The same layers the engine quantizes: decoder blocks and the context projection, not the heads.
    quantize_(
        qmodel, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.startswith("heads"),
    )
    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    # dynamic=True: one compilation serves the 3 step shapes and every batch size (static shapes
    # cost 3-5 minutes of recompiles per batch size on an H100: bench/NOTES.md). The cached beam
    # search calls each block's decode_step, not its forward.
    for block in qmodel.blocks:
        block.decode_step = torch.compile(block.decode_step, dynamic=True)
    return qmodel


def check_torchao(batch=2, context_len=3000) -> dict:
    """Teacher-forced logits: torchao float8 and the quant module's FP8Linear vs bf16 (eager)."""
    import copy

    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from onerec.quant.fp8 import FP8Linear

    model = build_model("1b", context_len, torch.device("cuda"), torch.bfloat16, 0)
    table, _ = random_index(100_000, model.cfg.codebook_size, 3, 0)
    sids, mask = random_requests(model.cfg, batch, context_len, table, 1, "cuda")
    target = sids[:, -1]
    with torch.no_grad():
        ref = model(sids, mask, target).float()
        ao = copy.deepcopy(model)
        quantize_(ao, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.startswith("heads"))
        got_ao = ao(sids, mask, target).float()
        ours = copy.deepcopy(model)
        for name, mod in list(ours.named_modules()):
            for child_name, child in list(mod.named_children()):
                fqn = f"{name}.{child_name}" if name else child_name
                if isinstance(child, torch.nn.Linear) and not fqn.startswith("heads"):
                    setattr(mod, child_name, FP8Linear.from_linear(child))
        got_ours = ours(sids, mask, target).float()
    rel = lambda a: float((a - ref).norm() / ref.norm())
    return {"torchao_rel_err": rel(got_ao), "fp8linear_rel_err": rel(got_ours),
            "torchao_vs_fp8linear": float((got_ao - got_ours).norm() / got_ours.norm()),
            "ref_logit_std": float(ref.std())}
