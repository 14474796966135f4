"""Serving: the HTTP inference server and where it gets its model.

- onerec.serve.model_store: model URI -> verified local folder -> loaded model (fp8 or bf16)
- onerec.serve.batcher: dynamic batching of concurrent requests into one beam search
- onerec.serve.app: the FastAPI app (recommend, KServe v2 health/metadata, Prometheus metrics)
- onerec.serve.server: the `onerec-fp8 serve` command (uvicorn, graceful drain)
- onerec.serve.registry: models:/ URIs from the MLflow registry -> verified local folders

Importing this package is light (no torch): the rollout parses model URIs with it.
"""
