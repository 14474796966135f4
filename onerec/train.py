"""`onerec-fp8 train`: train a OneRec-V2 checkpoint on a data folder.

Steps: load the folder, split leave-last-out, build the semantic-id table from the training
interactions, set the model's profile normalisation from the users table, then AdamW with linear
warmup + cosine decay on the teacher-forced next-item loss (mean cross-entropy over the 3
semantic-id levels, plus the MoE load-balancing loss when the preset has experts). After every
epoch the validation loss is measured; training stops when it has not improved for `patience`
epochs and the best epoch's weights are saved. bf16 autocast on GPU, fp32 on CPU. Deterministic
given the seed on CPU (same thread count, same library versions).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from onerec.devices import resolve_device
from onerec.errors import UserError
from onerec.features import MAX_VALUES, MIN_COUNT, build_vocabularies
from onerec.manifest import manifest_digest

log = logging.getLogger(__name__)

MOE_AUX_WEIGHT = 0.01


def default_lr(d_model: int) -> float:
    # Small models tolerate (and need, in few minutes of CPU) a larger step; big ones do not.
    return 2e-3 if d_model <= 256 else 3e-4


def default_threads(cfg) -> int:
    """CPU threads for a model: 1 for the small CPU presets, torch's default otherwise.

    A tiny model's matrices are too small to gain from a second thread, and on a shared machine
    threads that wait for each other at every op cost far more than they give (measured: 0.08 s
    per `tiny` step with one thread, 1.4 s with two on a loaded 2-core machine).
    """
    import torch  # heavy: torch

    return 1 if cfg.d_model <= 256 else torch.get_num_threads()


def _known_targets(requests, table):
    t = requests["target"].to_numpy(np.int64)
    ok = (t >= 0) & (t < len(table))
    ok[ok] = (table[t[ok]] >= 0).all(1)
    return requests[ok].reset_index(drop=True)


def _validation_loss(model, requests, table, cfg, batch_size: int, device, autocast) -> float:
    import torch  # heavy: torch

    from onerec.data import iter_batches  # heavy: pandas, torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in iter_batches(requests, table, cfg.context_len, cfg.profile_features, batch_size,
                                  categorical=cfg.categorical_features):
            b = batch.to(device)
            with autocast():
                logits = model(b.history_sids, b.history_mask, b.target_sids, b.profile)
            total += float(model.loss(logits, b.target_sids)) * len(b.target_items)
            count += len(b.target_items)
    model.train()
    return total / max(count, 1)


def train(
    data_dir: str | Path,
    preset: str = "tiny",
    out: str | Path = "checkpoint",
    epochs: int = 5,
    seed: int = 0,
    batch_size: int = 256,
    lr: float | None = None,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.05,
    patience: int = 2,
    device: str | None = None,
    threads: int | None = None,
    max_valid_requests: int = 2000,
    overwrite: bool = False,
    progress: bool = True,
    max_category_values: int = MAX_VALUES,
    min_category_count: int = MIN_COUNT,
    held_out_positions: int = 1,
) -> dict:
    """Train and save a checkpoint folder; returns the result (checkpoint path, epochs, losses, seconds).

    `held_out_positions`: each user's last N interactions stay out of training (onerec.data's split),
    so `eval` / `gate quality` with `--positions N` score only positions the model never trained on.
    """
    import torch  # heavy: torch
    from tqdm import tqdm  # heavy: tqdm

    from onerec.checkpoint import save_checkpoint  # heavy: safetensors, torch
    from onerec.data import (  # heavy: pandas, torch
        iter_batches,
        load_dataset,
        split_leave_last_out,
        training_interactions,
    )
    from onerec.model import PRESETS, OneRecV2, OneRecV2Config  # heavy: torch
    from onerec.semantic_ids import build_semantic_ids  # heavy: torch

    started = time.perf_counter()
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if epochs < 1 or batch_size < 1:
        raise UserError("epochs and batch size must be positive")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    device = resolve_device(device)

    dataset = load_dataset(data_dir)
    cfg = OneRecV2Config.from_preset(preset, profile_features=dataset.profile_features)
    split = split_leave_last_out(dataset, max_history=cfg.context_len, positions=held_out_positions)
    if dataset.categorical_features:  # vocabularies from the training users only
        training_users = dataset.users[dataset.users["user_id"].isin(split.train["user_id"].unique())]
        cfg.categorical_features = build_vocabularies(training_users, dataset.categorical_features,
                                                      max_category_values, min_category_count)
        log.info("categorical profile features: %s",
                 ", ".join(f"{n} ({len(v)} values + unknown)" for n, v in cfg.categorical_features.items()))
    log.info("building semantic ids (codebook %d x %d levels)", cfg.codebook_size, cfg.n_levels)
    table = build_semantic_ids(training_interactions(dataset), cfg.codebook_size, seed=seed, n_levels=cfg.n_levels,
                               items_table=dataset.items)
    train_requests = _known_targets(split.train, table)
    valid_requests = _known_targets(split.valid, table)
    if train_requests.empty:
        raise UserError(f"{data_dir}: no training requests (users need at least 2 interactions)")
    if len(valid_requests) > max_valid_requests:
        valid_requests = valid_requests.sample(n=max_valid_requests, random_state=seed).reset_index(drop=True)

    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or default_threads(cfg))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        model = OneRecV2(cfg)
        if cfg.profile_features:
            profiles = dataset.users[cfg.profile_features].to_numpy(np.float64)
            # Missing values are filled with the mean (onerec.data): the statistics skip them.
            mean, std = np.nan_to_num(np.nanmean(profiles, 0)), np.nan_to_num(np.nanstd(profiles, 0))
            model.context.profile_mean.copy_(torch.from_numpy(mean).float())
            model.context.profile_std.copy_(torch.from_numpy(np.maximum(std, 1e-6)).float())
        model.to(device).train()

        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        peak_lr = lr or default_lr(cfg.d_model)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=peak_lr, betas=(0.9, 0.98),
        )
        steps_per_epoch = math.ceil(len(train_requests) / batch_size)
        total_steps = epochs * steps_per_epoch
        warmup = max(1, int(warmup_fraction * total_steps))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress_ = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))  # cosine down to 10%

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        log.info(
            "training %s (%.2fM parameters) on %s: %d train / %d valid requests, %d steps/epoch",
            preset, sum(p.numel() for p in model.parameters()) / 1e6, device,
            len(train_requests), len(valid_requests), steps_per_epoch,
        )
        train_losses, valid_losses = [], []
        best_loss, best_epoch, best_state, stale = float("inf"), -1, None, 0
        step = 0
        for epoch in range(epochs):
            running, seen = 0.0, 0
            batches = iter_batches(
                train_requests, table, cfg.context_len, cfg.profile_features, batch_size,
                shuffle=True, seed=seed * 1000 + epoch, categorical=cfg.categorical_features,
            )
            bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr,
                       disable=not progress, leave=False, mininterval=1.0)
            for batch in bar:
                b = batch.to(device)
                with autocast():
                    logits = model(b.history_sids, b.history_mask, b.target_sids, b.profile)
                    loss = model.loss(logits, b.target_sids)
                    if cfg.n_routed_experts:
                        loss = loss + MOE_AUX_WEIGHT * model.moe_aux_loss()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                running += float(loss.detach()) * len(b.target_items)
                seen += len(b.target_items)
                bar.set_postfix(loss=f"{running / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.close()
            train_losses.append(running / max(seen, 1))
            if valid_requests.empty:  # nothing to early-stop on: keep the last epoch
                valid_losses.append(float("nan"))
                best_epoch, best_state = epoch, None
                log.info("epoch %d: train loss %.4f", epoch + 1, train_losses[-1])
                continue
            valid_losses.append(_validation_loss(model, valid_requests, table, cfg, 1024, device, autocast))
            log.info("epoch %d: train loss %.4f, valid loss %.4f", epoch + 1, train_losses[-1], valid_losses[-1])
            if valid_losses[-1] < best_loss - 1e-4:
                best_loss, best_epoch, stale = valid_losses[-1], epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    log.info("early stop: no validation improvement for %d epochs", patience)
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        model = model.to("cpu", torch.float32).eval()
        seconds = time.perf_counter() - started
        metrics = {
            "preset": preset,
            "seed": seed,
            "data": str(data_dir),
            "epochs_run": len(train_losses),
            "best_epoch": best_epoch + 1,
            "steps": step,
            "train_losses": train_losses,
            "valid_losses": valid_losses,
            "best_valid_loss": None if math.isinf(best_loss) else best_loss,
            "train_requests": len(train_requests),
            "valid_requests": len(valid_requests),
            "known_items": int((table >= 0).all(1).sum()),
            "profile_features": {"numeric": list(cfg.profile_features),
                                 "categorical": {n: len(v) for n, v in cfg.categorical_features.items()}},
            "lr": peak_lr,
            "batch_size": batch_size,
            "device": str(device),
            "seconds": round(seconds, 2),
        }

        def write_metrics(folder: Path) -> None:
            (folder / "train_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

        save_checkpoint(model, table, out, overwrite=overwrite, extra=write_metrics)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)
    return {"checkpoint": str(out), "checkpoint_sha256": manifest_digest(out), **metrics}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data folder (interactions.parquet|csv, ...)")
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, tiny-moe, small, 0.1b, ...)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--epochs", type=int, default=5, help="maximum epochs (early stop on validation loss)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default by model size)")
    parser.add_argument("--patience", type=int, default=2, help="epochs without validation improvement")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for tiny/small presets)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--held-out-positions", type=int, default=1,
                        help="keep each user's last N interactions out of training (for eval/gate --positions N)")
    parser.add_argument("--max-category-values", type=int, default=MAX_VALUES,
                        help="categorical profile features: keep at most this many values (most frequent)")
    parser.add_argument("--min-category-count", type=int, default=MIN_COUNT,
                        help="categorical profile features: values held by fewer training users are unknown")


def main(args: argparse.Namespace) -> dict:
    return train(
        args.data, preset=args.preset, out=args.out, epochs=args.epochs, seed=args.seed,
        batch_size=args.batch_size, lr=args.lr, patience=args.patience, device=args.device,
        threads=args.threads, overwrite=args.overwrite, max_category_values=args.max_category_values,
        min_category_count=args.min_category_count, held_out_positions=args.held_out_positions,
    )
