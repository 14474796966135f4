"""GPU check of the serving path: `onerec-fp8 serve` loads a model with load_served_model and, on
CUDA, answers through the engine (onerec.engine.Engine). This compares its top-k with the
reference beam search on the same GPU model, for a bf16 checkpoint and its FP8 artifact, on real
validation histories, and writes one JSON.

    PYTHONPATH=. python3 bench/gpu_serving_check.py --trained .bench_ckpt --out OUT_DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trained", type=Path, required=True, help="folder with ckpt/, quantized/, data/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--beams", default="16,128")
    args = parser.parse_args()

    from onerec.data import iter_batches, load_dataset, split_leave_last_out
    from onerec.evaluate import topk_overlap
    from onerec.generate import beam_search
    from onerec.serve.model_store import load_served_model

    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "command": " ".join(["python3", *sys.argv]), "models": {},
    }
    ok = True
    for kind in ("ckpt", "quantized"):
        served = load_served_model(str(args.trained / kind), device="cuda")
        cfg = served.model.cfg
        requests = split_leave_last_out(load_dataset(args.trained / "data"), max_history=cfg.context_len).valid
        requests = requests.head(args.users)
        row = {"backend": served.backend, "kind": served.kind}
        for beam in [int(b) for b in args.beams.split(",")]:
            fast_items, ref_items = [], []
            for batch in iter_batches(requests, served.table, cfg.context_len, cfg.profile_features, 64,
                                      categorical=cfg.categorical_features):
                b = batch.to("cuda")
                fast = served.search(b.history_sids, b.history_mask, b.profile, beam, 10)
                ref = beam_search(served.model, b.history_sids, b.history_mask, served.index, b.profile, beam_size=beam, k=10)
                fast_items.append(fast.items.cpu().numpy())
                ref_items.append(ref.items.cpu().numpy())
            overlap = topk_overlap(np.concatenate(fast_items), np.concatenate(ref_items), 10)
            row[f"top10_overlap_engine_vs_reference_beam{beam}"] = overlap
            ok &= served.backend == "engine" and overlap >= 0.95
        result["models"][kind] = row
        print(kind, row, flush=True)
    result["ok"] = bool(ok)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_engine_check_h100.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
