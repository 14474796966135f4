"""Bring-your-own-data end to end: a users table with string, categorical and missing profile values.

One small data folder (synthetic interactions plus hand-made profile columns, users without a
profile row, a user with a long history, users with a single interaction) trains the `tiny`
preset for two epochs; the checkpoint then goes through `data calibration`, quantize (with the
table and with the data folder itself), eval, the quality gate, the calibration checks and the
server, with categorical values the model never saw.
"""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout

import httpx
import numpy as np
import pandas as pd
import pytest
from serving_checkpoints import serve_in_thread, wait_ready

from onerec.checkpoint import load_checkpoint

LONG_USER, ONE_ITEM_USERS = 10_000, [10_001, 10_002, 10_003]


def _cli(argv):
    from onerec_fp8.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv)
    text = out.getvalue()
    return code, json.loads(text) if text.strip() else None


def write_data(folder):
    from onerec.synth import synthesize

    synthesize(folder, seed=1, users=150, items=120, interactions_per_user=20, topics=6)
    inter = pd.read_parquet(folder / "interactions.parquet")
    rng = np.random.default_rng(1)
    extra = [(LONG_USER, int(i), t) for t, i in enumerate(rng.integers(0, 120, 90))]  # > context_len (50)
    extra += [(u, 3, 0) for u in ONE_ITEM_USERS]  # no training request: not a training user
    inter = pd.concat([inter, pd.DataFrame(extra, columns=inter.columns).astype(inter.dtypes)], ignore_index=True)
    inter.to_parquet(folder / "interactions.parquet", index=False)
    users = pd.read_parquet(folder / "users.parquet")
    users = pd.concat([users, pd.DataFrame({"user_id": [LONG_USER, *ONE_ITEM_USERS]})], ignore_index=True)
    n = len(users)
    users["gender"] = pd.array(rng.choice(["f", "m", "x"], n, p=[0.48, 0.48, 0.04]), dtype="object")
    users.loc[users.index[::9], "gender"] = None  # missing values
    users["occupation"] = pd.Categorical(rng.choice(["eng", "art", "doc"], n))
    users.loc[users["user_id"].isin(ONE_ITEM_USERS), "occupation"] = "doc"
    users["occupation"] = users["occupation"].cat.add_categories(["pilot"])
    users.loc[users["user_id"].isin(ONE_ITEM_USERS), "occupation"] = "pilot"  # held by non-training users only
    users["country"] = rng.choice([f"c{i}" for i in range(6)], n).astype(str)
    first_numeric = users.columns[1]
    users.loc[users.index[:4], first_numeric] = np.nan
    users = users[~users["user_id"].isin([0, 1])]  # two users without a profile row
    users.to_parquet(folder / "users.parquet", index=False)
    return folder


@pytest.fixture(scope="module")
def byod(tmp_path_factory):
    root = tmp_path_factory.mktemp("byod")
    data = write_data(root / "data")
    code, result = _cli(["train", "--data", str(data), "--out", str(root / "ckpt"), "--epochs", "2",
                         "--min-category-count", "2", "--seed", "0"])
    assert code == 0, result
    return root, data, root / "ckpt", result


def test_training_builds_vocabularies_from_training_users(byod):
    root, data, ckpt, result = byod
    assert set(result["profile_features"]["categorical"]) == {"gender", "occupation", "country"}
    model, _ = load_checkpoint(ckpt)
    vocab = model.cfg.categorical_features
    assert sorted(vocab["occupation"]) == ["art", "doc", "eng"]  # "pilot" only among non-training users
    assert sorted(vocab["gender"]) == ["f", "m", "x"]
    assert "None" not in vocab["gender"] and "nan" not in vocab["gender"]  # missing is the unknown bucket
    assert model.cfg.profile_columns[-3:] == ["country", "gender", "occupation"]  # by name: one order
    assert np.isfinite(model.context.profile_mean.numpy()).all()  # missing numeric values skipped
    config = json.loads((ckpt / "config.json").read_text())
    assert config["categorical_features"] == vocab  # plain JSON in the checkpoint, under the manifest
    assert "config.json" in json.loads((ckpt / "manifest.json").read_text())


def test_checkpoints_without_categorical_features_still_load(tmp_path):
    from serving_checkpoints import random_tiny_checkpoint

    from onerec.manifest import write_manifest

    folder = random_tiny_checkpoint(tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["categorical_features"]  # as written before categorical features existed
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "manifest.json").unlink()
    write_manifest(folder)
    model, _ = load_checkpoint(folder)
    assert model.cfg.categorical_features == {} and model.context.category_embedding is None
    # a malformed vocabulary in config.json is a one-line error, not a traceback
    from onerec.errors import UserError

    config["categorical_features"] = {"gender": [1, 2]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "manifest.json").unlink()
    write_manifest(folder)
    with pytest.raises(UserError, match="categorical_features must map") as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value)


def test_unseen_values_are_counted_never_an_error(byod, tmp_path):
    root, data, ckpt, _ = byod
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    users = pd.read_parquet(changed / "users.parquet")
    users.loc[users.index[:10], "country"] = "atlantis"
    users.to_parquet(changed / "users.parquet", index=False)
    code, result = _cli(["eval", "--checkpoint", str(ckpt), "--data", str(changed)])
    assert code == 0 and result["num_users"] > 100
    assert result["unseen_profile_values"]["country"] == 10
    assert result["unseen_profile_values"]["occupation"] == 0


def test_calibration_command_and_a_data_folder_as_calibration(byod, tmp_path):
    from onerec.data import load_dataset, split_leave_last_out

    root, data, ckpt, _ = byod
    out = tmp_path / "calib.parquet"
    code, result = _cli(["data", "calibration", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(out),
                         "--requests", "300", "--seed", "3"])
    assert code == 0 and result["requests"] == 300 and result["split"] == "train"
    assert sorted(result["profile_features"]["categorical"]) == ["country", "gender", "occupation"]
    table = pd.read_parquet(out)
    split = split_leave_last_out(load_dataset(data), max_history=50)
    train_keys = set(zip(split.train["user_id"], split.train["target"], split.train["history"].map(len), strict=True))
    assert set(zip(table["user_id"], table["target"], table["history"].map(len), strict=True)) <= train_keys
    assert table["history"].map(len).max() <= 50
    code, again = _cli(["data", "calibration", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(out)])
    assert code == 1 and again is None  # no silent overwrite
    # quantize: the table, and the data folder itself (drawn the same way, and said so)
    code, from_table = _cli(["quantize", "--checkpoint", str(ckpt), "--calibration", str(out), "--out",
                             str(tmp_path / "q1"), "--max-requests", "128"])
    assert code == 0 and from_table["calibration_source"]["kind"] == "request table"
    code, from_data = _cli(["quantize", "--checkpoint", str(ckpt), "--calibration", str(data), "--out",
                            str(tmp_path / "q2"), "--max-requests", "128"])
    assert code == 0 and from_data["calibration_source"] == {
        "kind": "drawn from data folder", "data": str(data), "seed": 0, "split": "train", "held_out_positions": 10,
        # every training request before each user's last 10 interactions, at most 2048
        "requests": min(2048, len(split_leave_last_out(load_dataset(data), max_history=50, positions=10).train))}
    code, analysis = _cli(["analyze", "--checkpoint", str(ckpt), "--calibration", str(data), "--out",
                           str(tmp_path / "analysis"), "--max-requests", "64"])
    assert code == 0 and analysis["calibration_source"]["kind"] == "drawn from data folder"


@pytest.fixture(scope="module")
def quantized(byod):
    root, data, ckpt, _ = byod
    code, result = _cli(["quantize", "--checkpoint", str(ckpt), "--calibration", str(data), "--out",
                         str(root / "fp8"), "--max-requests", "256"])
    assert code == 0, result
    return root / "fp8"


def test_quality_gate_on_categorical_data(byod, quantized):
    root, data, ckpt, _ = byod
    code, result = _cli(["gate", "quality", "--checkpoint", str(ckpt), "--quantized", str(quantized),
                         "--data", str(data), "--report-dir", str(root / "gate")])
    assert code == {"passed": 0, "failed": 3, "inconclusive": 4}[result["verdict"]]
    assert result["verdict"] == "passed", result["reason"]  # FP8 of a tiny model: well inside 5%
    for metric in ("recall@10", "ndcg@10"):
        interval = result["intervals"][metric]
        assert interval["low"] <= interval["estimate"] <= interval["high"] and interval["num_users"] == result["num_users"]
        floor = result["noise_floor"][metric]
        assert floor["low"] <= floor["estimate"] <= floor["high"]
    assert (root / "gate" / "quality_gate.png").stat().st_size > 10_000


def test_latency_gate_on_categorical_data(byod, quantized, tmp_path):
    """The latency gate replays a calibration table with string values (some unseen) and fills
    random requests as the server fills a user who sends no profile (unknown bucket)."""
    import torch

    from onerec.engine.latency_gate import LatencyGateConfig, make_requests, measure_latency

    root, data, ckpt, _ = byod
    table_path = tmp_path / "calib.parquet"
    code, _ = _cli(["data", "calibration", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(table_path),
                    "--requests", "40"])
    assert code == 0
    table = pd.read_parquet(table_path)
    table.loc[table.index[:5], "country"] = "atlantis"
    table.to_parquet(table_path, index=False)
    config = LatencyGateConfig(batch_sizes=(2,), beam_size=16, k=5, warmup=1, repeats=2)
    for requests_path in (table_path, None):
        result = measure_latency(ckpt, quantized, config, requests_path=requests_path, allow_cpu=True)
        assert result["measurable"] is True and result["latency_ms"]["fp8"][2]["p50_ms"] > 0, result
    model, sid_table = load_checkpoint(ckpt)
    _, _, profile = make_requests(model, sid_table, 3, 50)
    numeric = len(model.cfg.profile_features)
    assert profile.shape == (3, len(model.cfg.profile_columns))
    assert torch.equal(profile[:, :numeric], model.context.profile_mean.float().expand(3, -1))
    assert not profile[:, numeric:].any()  # every categorical feature in the unknown bucket


def test_served_with_unseen_categories_and_typed_profiles(byod, quantized):
    from onerec.serve.app import ServerConfig, create_app

    root, data, ckpt, _ = byod
    model, table = load_checkpoint(ckpt)
    history = [int(i) for i in np.flatnonzero((table >= 0).all(1))[:8]]
    numeric = model.cfg.profile_features[0]
    config = ServerConfig(model_uri=str(quantized), device="cpu", default_k=5, default_beam=16, max_wait_ms=1)
    with serve_in_thread(create_app(config)) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        wait_ready(client, url)

        def post(profile):
            return client.post("/v1/recommend", json={"users": [{"history": history, "profile": profile}]})

        seen = post({numeric: 30.0, "gender": "f", "occupation": "eng", "country": "c1"})
        assert seen.status_code == 200, seen.text
        assert seen.json()["users"][0]["unseen_profile_values"] == 0
        unseen = post({numeric: 30.0, "gender": "nonbinary", "occupation": "astronaut"})
        assert unseen.status_code == 200, unseen.text
        user = unseen.json()["users"][0]
        assert user["unseen_profile_values"] == 2 and len(user["items"]) == 5
        assert user["filled_profile_features"] == len(model.cfg.profile_columns) - 3  # country and the rest
        for bad in ({"gender": 1.0}, {numeric: "old"}, {numeric: 1e39}):
            r = post(bad)
            assert r.status_code == 422 and r.json()["error"], (bad, r.text)
        metrics = client.get("/metrics").text
        assert 'onerec_unseen_profile_values_total{feature="gender"} 1.0' in metrics
        assert 'onerec_unseen_profile_values_total{feature="occupation"} 1.0' in metrics
        meta = client.get("/v2/models/onerec-v2-fp8").json()
        assert meta["parameters"]["categorical_profile_features"] == ["country", "gender", "occupation"]
        # the same user as Open Inference Protocol tensors: categorical values as BYTES
        assert {t["name"]: t["datatype"] for t in meta["inputs"]} == {
            "history": "INT64", "profile": "FP32", "categorical_profile": "BYTES"}
        numeric_row = [30.0 if n == numeric else m for n, m in zip(
            meta["parameters"]["profile_features"], model.context.profile_mean.tolist(), strict=True)]
        v2 = client.post("/v2/models/onerec-v2-fp8/infer", json={"inputs": [
            {"name": "history", "datatype": "INT64", "shape": [1, len(history)], "data": history},
            {"name": "profile", "datatype": "FP32", "shape": [1, len(numeric_row)], "data": numeric_row},
            {"name": "categorical_profile", "datatype": "BYTES", "shape": [1, 3], "data": ["c1", "f", "eng"]},
        ]})
        assert v2.status_code == 200, v2.text
        items = next(o for o in v2.json()["outputs"] if o["name"] == "items")
        assert items["data"] == seen.json()["users"][0]["items"]


def test_calibration_checks_cover_categorical_columns(byod, tmp_path):
    from tasks.config import PipelineConfig
    from tasks.validate import data_profile, validate_calibration

    root, data, ckpt, _ = byod
    good = tmp_path / "good.parquet"
    assert _cli(["data", "calibration", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(good),
                 "--requests", "300"])[0] == 0
    result = validate_calibration(PipelineConfig(), good, ckpt, tmp_path / "r1")
    assert result["passed"], result["failed"]
    frame = pd.read_parquet(good)
    frame["history"] = frame["history"].map(list)
    reference = data_profile(frame)
    assert set(reference["category_counts"]) == {"gender", "occupation", "country"}
    bad = frame.copy()
    bad["gender"] = 1  # numbers where the model expects text
    bad.loc[: len(bad) // 3, "country"] = "atlantis"  # a third outside the vocabulary
    bad.to_parquet(tmp_path / "bad.parquet")
    failed = {f["column"] for f in validate_calibration(PipelineConfig(), tmp_path / "bad.parquet", ckpt,
                                                        tmp_path / "r2")["failed"]}
    assert {"gender__is_text", "country__unseen"} <= failed
    drifted = frame.copy()
    drifted["occupation"] = "art"  # every value the same: the distribution moved, each value is known
    drifted.to_parquet(tmp_path / "drift.parquet")
    result = validate_calibration(PipelineConfig(), tmp_path / "drift.parquet", ckpt, tmp_path / "r3", reference)
    assert [f["column"] for f in result["failed"]] == ["category__occupation"]
    assert result["drift"]["category_kl"]["occupation"] > 0.5 and result["drift"]["category_kl"]["gender"] < 0.1


def test_gate_decision_on_constructed_fp8_outputs(byod):
    """The gate's whole decision path on the real model and users, with FP8 top-K lists constructed
    so the truth is known: identical lists pass; losing 40% of the hits fails on all users and is
    inconclusive on a handful; a broken ranking fails on the sensitive check whatever the sample."""
    import torch

    from onerec.data import load_dataset, split_leave_last_out
    from onerec.quant.quality_gate import QualityComparison, QualityGateConfig

    root, data, ckpt, _ = byod
    model, table = load_checkpoint(ckpt, dtype=torch.bfloat16)
    test = split_leave_last_out(load_dataset(data), max_history=model.cfg.context_len).test

    def comparison(requests):
        return QualityComparison(model, table, requests.reset_index(drop=True), QualityGateConfig())

    def losing(c, share):
        items = c.bf16_items.copy()
        hit_rows = np.flatnonzero((items[:, :10] == c.targets[:, None]).any(1))
        lost = hit_rows[: int(round(share * len(hit_rows)))]
        items[lost] = np.where(items[lost] == c.targets[lost, None], -1, items[lost])
        return items

    everyone = comparison(test)
    kl, sqnr = [0.0, 0.0, 0.0], {"layer": 35.0}
    same = everyone.judge(everyone.bf16_items.copy(), kl, sqnr)
    assert same["verdict"] == "passed" and same["intervals"]["recall@10"]["high"] == 0.0
    lost = everyone.judge(losing(everyone, 0.4), kl, sqnr)
    assert lost["verdict"] == "failed" and lost["intervals"]["recall@10"]["high"] < -0.05
    assert lost["intervals"]["recall@10"]["low"] <= -0.4 + 0.02  # covers the true -40% (up to rounding)
    assert lost["checks"]["topk_overlap"]  # only the recall/NDCG intervals failed it
    hit_rows = np.flatnonzero((everyone.bf16_items == everyone.targets[:, None]).any(1))
    few = comparison(test.iloc[np.r_[hit_rows[:5], np.flatnonzero(~np.isin(np.arange(len(test)), hit_rows))[:7]]])
    small = few.judge(losing(few, 0.2), kl, sqnr)  # 1 of 5 hits lost among 12 users
    assert small["verdict"] == "inconclusive" and small["passed"] is False
    assert small["users_needed"] > 12 and "would decide it" in small["reason"]
    shuffled = everyone.judge(np.roll(everyone.bf16_items, 1, axis=0), kl, sqnr)
    assert shuffled["verdict"] == "failed" and not shuffled["checks"]["topk_overlap"]


def test_unused_item_columns_are_ignored_and_logged(caplog):
    from onerec.semantic_ids import feature_embeddings

    items = pd.DataFrame({"item_id": range(300), "title": [f"title {i}" for i in range(300)],
                          "price": np.linspace(1.0, 9.0, 300), "genre": np.arange(300) % 7})
    with caplog.at_level("INFO", logger="onerec.semantic_ids"):
        feats = feature_embeddings(items, np.arange(300))
    assert feats.shape == (300, 1 + 7)  # price as a z-score, genre one-hot; the free text is not used
    assert "column 'title' ignored" in caplog.text


def test_publish_draws_the_calibration_table_from_a_data_folder(byod, monkeypatch, tmp_path):
    """S3 is faked here (the pipeline integration tests publish to a real moto server)."""
    import tasks.publish as checkpoints  # publish's S3 helpers (tasks.checkpoints), as publish sees them
    from onerec.errors import UserError
    from tasks.config import PipelineConfig
    from tasks.publish import publish

    root, data, ckpt, _ = byod
    uploaded = {}

    def nothing_published(cfg, client):
        raise UserError("no checkpoint yet")

    def upload_file(client, path, uri):
        uploaded[uri] = pd.read_parquet(path)

    monkeypatch.setattr(checkpoints, "find_latest_checkpoint", nothing_published)
    monkeypatch.setattr(checkpoints, "upload_folder", lambda client, folder, uri: ["manifest.json"])
    monkeypatch.setattr(checkpoints, "upload_file", upload_file)
    monkeypatch.setattr(checkpoints, "s3_exists", lambda client, uri: False)
    monkeypatch.setattr(checkpoints, "write_json", lambda client, uri, obj: uploaded.__setitem__(uri, obj))
    cfg = PipelineConfig.from_env({}, {"s3_bucket": "bucket", "s3_prefix": "prefix", "state_dir": str(tmp_path)})
    result = publish(cfg, str(ckpt), str(data), "2026-01-02", "ckpt1", client=object())
    uri = f"s3://bucket/prefix/calibration/2026-01-02/{result['calibration_sha256']}.parquet"
    assert result["calibration_uri"] == uri and result["calibration_source"]["kind"] == "drawn from data folder"
    assert uploaded["s3://bucket/prefix/calibration/2026-01-02/calibration.json"]["calibration_uri"] == uri
    assert len(uploaded[uri]) == result["calibration_source"]["requests"] > 0  # every request the draw made
    assert {"gender", "occupation", "country"} <= set(uploaded[uri].columns)
