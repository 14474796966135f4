"""Tune the fused MoE's Triton launch configs on this GPU: the device's table for onerec/kernels/configs/.

    PYTHONPATH=. python3 bench/tune_fused_moe.py --out DIR --time-budget 200
    PYTHONPATH=. python3 bench/tune_fused_moe.py --out DIR --dry-run     # no GPU: the candidates

For the experts of a preset (default moe-4b: d_model 1408, 53 routed + 1 shared experts of hidden
1408, top-3), in bf16 and in FP8 (1x128 activation, 128x128 weight blocks), at each token count of
--tokens: for each BLOCK_M, every candidate config of the gate|up kernel and of the down kernel is
timed alone on the same routed tokens (`triton.testing.do_bench_cudagraph`, median); the chosen
BLOCK_M is the one whose fastest gate|up + fastest down is the least. Candidates are fitted to the
device's shared memory first (`onerec.kernels.triton_fused_moe.fit_shared_memory`; duplicates
dropped). The whole op with the chosen config is then timed against the heuristic default config
and checked against the torch reference.

The time budget is shared by the (format, token count) items: each gets an even part of what is
left, its BLOCK_M nearest the heuristic's first; BLOCK_Ms left when its part is spent are skipped
(listed in the results). Progress lines go to stderr.

Writes, <device> being e.g. nvidia_h200:
- DIR/fused_moe_<device>.json: the table (this device's packaged table, if any, with the tuned
  shape's formats replaced): copy it to onerec/kernels/configs/;
- DIR/tune_fused_moe_<device>.json: every timing, the chosen and default configs and their times,
  device, versions, date and the command.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from onerec import kernels  # noqa: E402
from onerec.engine.layers import stack_experts  # noqa: E402
from onerec.kernels import Kernel  # noqa: E402
from onerec.kernels import fused_moe as mk  # noqa: E402
from onerec.kernels import triton_fused_moe as tmk  # noqa: E402

TOKENS = (512, 1536, 4096, 8192, 16384, 49152)  # users x beam 512: 1, 3, 8, 16, 32, 96 users
FORMATS = ("bf16", "fp8")
# The search space per kernel (a config is BLOCK_M and, per kernel, these); 8 warps only where a
# tile has 64+ rows (two warp groups of Hopper's 64-row wgmma).
SPACE = {
    "BLOCK_M": (16, 32, 64, 128),
    "bf16": {"BLOCK_N_K": ((64, 128), (128, 64), (128, 128)), "num_stages": (3, 4)},
    "fp8": {"BLOCK_N_K": ((128, 128),), "num_stages": (3, 4, 5)},
    "num_warps": {16: (4,), 32: (4,), 64: (4, 8), 128: (4, 8)},
}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def block_ms(tokens: int, w: mk.MoEWeights, space: dict) -> list[int]:
    """The BLOCK_Ms worth timing at `tokens`: tiles of at most 2x and at least 1/64 of the rows per
    expert, nearest the heuristic's first."""
    pairs = tokens * (w.top_k + w.shared_folded)
    per_expert = pairs / w.w1.shape[0]
    fits = [bm for bm in space["BLOCK_M"] if bm <= max(space["BLOCK_M"][0], 2 * per_expert) and bm >= per_expert / 64]
    heuristic = tmk.default_config(pairs, w.w1.shape[0], w.fp8)["BLOCK_M"]
    return sorted(fits or [heuristic], key=lambda bm: abs(bm.bit_length() - heuristic.bit_length()))


def kernel_candidates(kernel: str, block_m: int, w: mk.MoEWeights, limit: int, space: dict) -> list[dict]:
    """The candidate configs of one kernel at `block_m`, fitted to `limit` bytes of shared memory, distinct."""
    fmt = "fp8" if w.fp8 else "bf16"
    out = []
    for bn, bk in space[fmt]["BLOCK_N_K"]:
        for warps in space["num_warps"][block_m]:
            for stages in space[fmt]["num_stages"]:
                kcfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
                full = {"BLOCK_M": block_m, **{k: kcfg for k in tmk.KERNELS}}
                fitted = tmk.fit_shared_memory(full, w.fp8, tmk.element_bytes(w), limit)[kernel]
                if fitted not in out:
                    out.append(fitted)
    return out


def meta_weights(preset: str, fp8: bool) -> mk.MoEWeights:
    """A preset's stacked expert weights on the meta device (shapes and dtypes only: configs, dry runs)."""
    from onerec.model import OneRecV2Config

    cfg = OneRecV2Config.from_preset(preset)
    E, d, hidden = cfg.n_routed_experts + 1, cfg.d_model, cfg.expert_hidden
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    weights = {name: torch.empty(E, *shape, dtype=dtype, device="meta")
               for name, shape in (("w1", (hidden, d)), ("w3", (hidden, d)), ("w2", (d, hidden)))}
    scales = {f"{name}_scale": torch.empty(E, -(-w.shape[1] // 128), -(-w.shape[2] // 128), device="meta")
              for name, w in weights.items()} if fp8 else {}
    return mk.MoEWeights(router=torch.empty(E - 1, d, dtype=torch.bfloat16, device="meta"), top_k=cfg.moe_top_k,
                         n_routed=E - 1, shared_folded=cfg.n_shared_experts == 1, **weights, **scales)


def random_weights(preset: str, device: str) -> dict[str, mk.MoEWeights]:
    """One MoE layer of `preset` with random weights (spread routing, no near-ties), bf16 and FP8."""
    from onerec.model import MoE, OneRecV2Config

    torch.manual_seed(0)
    moe = MoE(OneRecV2Config.from_preset(preset))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
        moe.router.weight.normal_(0, 0.1)
    moe = moe.to(device, torch.bfloat16).eval()
    return {"bf16": stack_experts(moe), "fp8": stack_experts(moe, fp8=True)}


def bench_ms(fn, rep_ms: float) -> float:
    """Median time of fn in ms: CUDA-graph replays on CUDA, one call elsewhere (a check of the logic)."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def time_kernels(x: torch.Tensor, w: mk.MoEWeights, block_m: int, limit: int, space: dict, rep_ms: float) -> dict:
    """Each candidate of gate|up and of down at `block_m`, timed alone on x's routing: {kernel: [{config, ms}]}."""
    gates, experts = mk.route(x, w.router, w.top_k)
    plan = tmk.plan_routes(gates, experts, w.w1.shape[0], w.shared_folded, block_m)
    x_in, x_scale = tmk.quantize_blocks(x) if w.fp8 else (x, None)
    runs = {"gate_up": lambda kcfg: tmk.gate_up(x_in, x_scale, plan, w, kcfg, x.dtype)}
    out: dict = {}
    for kernel in tmk.KERNELS:
        out[kernel] = []
        for kcfg in kernel_candidates(kernel, block_m, w, limit, space):
            try:
                with torch.no_grad():
                    run = functools.partial(runs[kernel], kcfg)
                    result = run()  # compiles outside the timing
                    out[kernel].append({**kcfg, "ms": bench_ms(run, rep_ms)})
            except Exception as exc:  # noqa: BLE001 - one failing candidate never stops the tune
                out[kernel].append({**kcfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            if "down" not in runs:  # down's input: gate_up's output
                h, h_scale = result
                runs["down"] = lambda kcfg, h=h, h_scale=h_scale: tmk.down(h, h_scale, plan, w, kcfg, x.dtype)
        if "down" not in runs:
            raise RuntimeError(f"no gate_up candidate ran at BLOCK_M={block_m}: {out[kernel]}")
    return out


def tune_item(w: mk.MoEWeights, tokens: int, limit: int, space: dict, rep_ms: float, deadline: float) -> dict:
    """One (format, token count): the candidates per BLOCK_M until `deadline`, the chosen config, and the
    whole op with it against the heuristic default (time and error against the torch reference)."""
    torch.manual_seed(tokens)
    device = w.w1.device
    x = torch.randn(tokens, w.w1.shape[2], device=device, dtype=torch.bfloat16)
    by_block_m, skipped, best = {}, [], None
    for i, block_m in enumerate(block_ms(tokens, w, space)):
        if i > 0 and time.time() > deadline:
            skipped.append(block_m)
            continue
        timings = time_kernels(x, w, block_m, limit, space, rep_ms)
        fastest = {k: min((t for t in timings[k] if "ms" in t), key=lambda t: t["ms"], default=None) for k in timings}
        by_block_m[block_m] = timings
        if None in fastest.values():
            continue
        ms = fastest["gate_up"]["ms"] + fastest["down"]["ms"]
        log(f"  BLOCK_M {block_m}: gate_up {fastest['gate_up']['ms']:.4f} ms + down {fastest['down']['ms']:.4f} ms "
            f"({len(timings['gate_up'])} + {len(timings['down'])} candidates)")
        if best is None or ms < best[0]:
            best = (ms, {"BLOCK_M": block_m, **{k: {key: fastest[k][key] for key in tmk.KERNEL_KEYS}
                                                 for k in tmk.KERNELS}})
    if best is None:
        raise RuntimeError(f"no config ran at {tokens} tokens: {by_block_m}")
    chosen = best[1]
    default = tmk.choose_config(tokens, w, None, limit)
    with torch.no_grad():
        ref = kernels.moe(x, w, Kernel.TORCH)
        out = kernels.moe(x, w, Kernel.TRITON, config=chosen)
        error = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        tuned_ms = bench_ms(lambda: kernels.moe(x, w, Kernel.TRITON, config=chosen), rep_ms)
        default_ms = bench_ms(lambda: kernels.moe(x, w, Kernel.TRITON, config=default), rep_ms)
    return {"tokens": tokens, "chosen": chosen, "kernels_ms": best[0], "moe_ms": tuned_ms,
            "default": default, "default_moe_ms": default_ms, "speedup_vs_default": default_ms / tuned_ms,
            "rel_error_vs_reference": error, "skipped_block_m": skipped,
            "timings": {str(bm): t for bm, t in by_block_m.items()}}


def tune(weights: dict[str, mk.MoEWeights], tokens: list[int], budget_s: float, limit: int,
         space: dict = SPACE, rep_ms: float = 5.0) -> dict:
    """Every (format, token count) item within `budget_s`: {format: {tokens: tune_item's result}}."""
    start = time.time()
    items = [(fmt, t) for t in tokens for fmt in weights]
    results: dict = {fmt: {} for fmt in weights}
    for i, (fmt, t) in enumerate(items):
        now = time.time()
        deadline = now + max(0.0, start + budget_s - now) / (len(items) - i)
        log(f"{fmt} at {t} tokens ({i + 1}/{len(items)}; {deadline - now:.0f} s of the budget) ...")
        try:
            r = tune_item(weights[fmt], t, limit, space, rep_ms, deadline)
        except Exception as exc:  # noqa: BLE001 - the other items still run; the table leaves this one out
            results[fmt][t] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"{fmt} at {t} tokens FAILED: {results[fmt][t]['error']}")
            continue
        results[fmt][t] = r
        log(f"{fmt} at {t} tokens: {describe(r['chosen'])}: {r['moe_ms']:.4f} ms, heuristic default "
            f"{r['default_moe_ms']:.4f} ms ({r['speedup_vs_default']:.2f}x), error vs reference "
            f"{r['rel_error_vs_reference']:.2e}")
    return results


def describe(cfg: dict) -> str:
    return f"BM{cfg['BLOCK_M']} " + " ".join(
        f"{k} N{c['BLOCK_N']}/K{c['BLOCK_K']}/w{c['num_warps']}/s{c['num_stages']}"
        for k, c in ((k, cfg[k]) for k in tmk.KERNELS))


def table(name: str, shape: str, results: dict, meta: dict) -> dict:
    """Device `name`'s table: its packaged table (if any) with `shape`'s formats replaced by the tuned configs."""
    packaged = tmk.table_path(name)
    configs = json.loads(packaged.read_text())["configs"] if packaged.exists() else {}
    configs[shape] = {**configs.get(shape, {}),
                      **{fmt: {str(t): r["chosen"] for t, r in sorted(by_tokens.items()) if "chosen" in r}
                         for fmt, by_tokens in results.items()}}
    return {"device": name, "made_by": meta["command"], "date": meta["date"], "triton": meta["triton"],
            "configs": configs}


def dry_run(preset: str, tokens: list[int], space: dict) -> None:
    """The candidates per format and token count on the preset's shapes, each checked against an H200's
    shared memory (no GPU needed)."""
    limit = tmk.HOPPER_SHARED_MEMORY
    compiles, timings = set(), 0
    for fmt in FORMATS:
        w = meta_weights(preset, fmt == "fp8")
        for t in tokens:
            parts = []
            for bm in block_ms(t, w, space):
                for kernel in tmk.KERNELS:
                    cands = kernel_candidates(kernel, bm, w, limit, space)
                    for c in cands:
                        used = tmk.shared_memory_bytes(kernel, bm, c, tmk.element_bytes(w))
                        if used > limit:
                            raise SystemExit(f"{fmt} {kernel} BLOCK_M={bm} {c}: {used} > {limit} bytes")
                        compiles.add((fmt, kernel, bm, *c.values()))
                    timings += len(cands)
                    parts.append(f"BM{bm} {kernel} {len(cands)}")
            print(f"{fmt} {t} tokens: " + ", ".join(parts))
    print(f"{len(compiles)} kernel compiles, {timings} kernel timings, every candidate within {limit} bytes "
          f"of shared memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the table and the results JSON")
    parser.add_argument("--preset", default="moe-4b", help="the model preset whose expert shapes are tuned")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts (users x beams)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="bf16, fp8 or both")
    parser.add_argument("--time-budget", type=float, default=200.0, help="seconds for all timings")
    parser.add_argument("--rep-ms", type=float, default=5.0, help="ms of replays per do_bench_cudagraph sample")
    parser.add_argument("--dry-run", action="store_true", help="list the candidates and check they fit; no GPU")
    args = parser.parse_args()
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
        formats = args.formats.split(",")
        if not tokens or min(tokens) < 1 or not set(formats) <= set(FORMATS):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--tokens must be positive integers and --formats among {','.join(FORMATS)}") from None
    if args.dry_run:
        dry_run(args.preset, tokens, SPACE)
        return
    if not torch.cuda.is_available():
        raise SystemExit("tune_fused_moe: needs a CUDA GPU (--dry-run lists the candidates without one)")
    from onerec.engine.latency_gate import environment

    device = torch.device("cuda", torch.cuda.current_device())
    meta = {**environment(device), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable, *sys.argv]), "preset": args.preset, "time_budget_s": args.time_budget,
            "shared_memory_limit": tmk.shared_memory_limit(device)}
    log(json.dumps(meta))
    weights = {fmt: w for fmt, w in random_weights(args.preset, "cuda").items() if fmt in formats}
    shape = tmk.shape_key(weights[formats[0]])
    results = tune(weights, tokens, args.time_budget, meta["shared_memory_limit"], rep_ms=args.rep_ms)
    meta["seconds"] = time.time() - T0
    name = tmk.device_name(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table_file = out / tmk.table_path(name).name
    results_file = out / f"tune_fused_moe_{tmk.device_slug(name)}.json"
    table_file.write_text(json.dumps(table(name, shape, results, meta), indent=1) + "\n")
    results_file.write_text(json.dumps({"meta": meta, "shape": shape, "results": results}, indent=1) + "\n")
    for fmt, by_tokens in results.items():
        for t, r in by_tokens.items():
            print(f"{fmt} {t:>6} tokens: " + (f"{describe(r['chosen'])}  {r['moe_ms']:.4f} ms "
                                              f"({r['speedup_vs_default']:.2f}x the heuristic)"
                                              if "chosen" in r else f"ERROR {r['error']}"))
    log(f"wrote {table_file} (copy it to {tmk.CONFIG_DIR}) and {results_file}")


if __name__ == "__main__":
    main()
