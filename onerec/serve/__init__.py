"""Serving: the HTTP inference server and the local reverse proxy that the rollout switches.

- onerec.serve.model_store: model URI -> verified local folder -> loaded model (fp8 or bf16)
- onerec.serve.batcher: dynamic batching of concurrent requests into one beam search
- onerec.serve.app: the FastAPI app (recommend, KServe v2 health/metadata, Prometheus metrics)
- onerec.serve.server: the `onerec-fp8 serve` command (uvicorn, graceful drain)
- onerec.serve.proxy: the always-on local endpoint whose upstream the local rollout switches

Importing this package is light (no torch): the proxy and the rollout use it without a model.
"""
