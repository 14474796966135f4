"""What a history bucket costs: the engine's time per batch against the history length it is padded
to, and the masked (padded) against the unmasked search at the full context (CUDA graphs, H100/H200).

    PYTHONPATH=. python3 bench/gpu_history_buckets.py --out OUT_DIR [--preset 1b --batches 1,8,32]

The served engine pads every batch up to a history bucket and always runs the masked search (one
graph per bucket, whatever the padding). This measures, on random weights of the preset, the time
of one batch at each bucket length (all positions real), and at the full context with and without
the mask: the first says what padding a short history up to the next bucket costs, the second what
always masking costs. One JSON (device, versions, date, command) in --out.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--lengths", default="64,256,1024,3000")
    parser.add_argument("--beam", type=int, default=512)
    parser.add_argument("--fp8", action="store_true", help="the FP8 engine (quantized on the fly)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import torch

    from bench.models import build_model
    from onerec.engine.engine import Engine, EngineConfig
    from onerec.engine.latency_gate import environment
    from onerec.engine.timing import percentile, random_index, random_requests, time_calls

    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lengths = [int(x) for x in args.lengths.split(",")]
    model = build_model(args.preset, max(lengths), torch.device("cuda"), torch.bfloat16, 0)
    table, index = random_index(1_000_000, model.cfg.codebook_size, model.cfg.n_levels, 0)
    index = index.to("cuda")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        engine = Engine(model, index, EngineConfig(beam_size=args.beam, k=10, fp8=args.fp8, batch_buckets=(batch,),
                                                   history_buckets=tuple(lengths)))
        for length in lengths:
            sids, mask = random_requests(model.cfg, batch, length, table, batch + length, "cuda")
            variants = [True, False] if length == max(lengths) else [True]
            for masked in variants:
                key = ("probe", batch, length, masked)
                fn = functools.partial(engine._graphs, key, sids, mask, None, padded=masked, beam=args.beam)
                ms = time_calls(fn, args.warmup, args.repeats)
                row = {"users": batch, "history_len": length, "masked": masked, "p50_ms": round(percentile(ms, 0.5), 3),
                       "requests_per_s": round(batch / percentile(ms, 0.5) * 1000, 1)}
                rows.append(row)
                print(f"[history-buckets {time.strftime('%H:%M:%S')}] {row}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    summary = {}
    for batch in {r["users"] for r in rows}:
        mine = {(r["history_len"], r["masked"]): r["p50_ms"] for r in rows if r["users"] == batch}
        full = max(lengths)
        summary[str(batch)] = {
            "time_vs_shortest_bucket": {str(t): round(mine[(t, True)] / mine[(min(lengths), True)], 3) for t in lengths},
            "masked_over_unmasked_at_full_context": round(mine[(full, True)] / mine[(full, False)], 3),
        }
    report = {"benchmark": "history buckets (bench/gpu_history_buckets.py)", "date": started,
              **environment(torch.device("cuda")), "command": " ".join(["python3", *sys.argv]),
              "preset": args.preset, "beam": args.beam, "fp8": args.fp8, "rows": rows, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    device = report["device"].replace(" ", "_").lower()
    path = args.out / f"engine_history_buckets_{device}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
