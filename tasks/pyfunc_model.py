"""The MLflow pyfunc model of a registered version, logged as "model from code" (never a pickle).

MLflow copies this file into the model and runs it on `mlflow.pyfunc.load_model(...)`; the model
loads the folder logged as artifact "quantized" (a quantized folder, recognised by recipe.json,
or a bf16 checkpoint folder) after verifying its manifest.

    model = mlflow.pyfunc.load_model("models:/onerec-v2-fp8@champion")
    model.predict(pd.DataFrame({"history": [[3, 17, 5]], "age": [31.0]}), params={"k": 10})
    -> DataFrame with columns items (list of item ids, best first), scores (list of floats)
       [+ user_id when the input has it]
"""

from __future__ import annotations

import mlflow
import pandas as pd

from onerec.devices import resolve_device


class OneRecPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from onerec.quant.export import load_model_folder  # heavy: torch

        self.device = str(resolve_device())
        self.model, self.table, _ = load_model_folder(context.artifacts["quantized"], self.device)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from onerec.evaluate import recommend  # heavy: torch

        params = params or {}
        k = int(params.get("k", 10))
        requests = model_input.copy()
        requests["history"] = requests["history"].map(lambda h: [int(i) for i in h])
        items, scores = recommend(self.model, self.table, requests, k=k, beam_size=int(params.get("beam_size", 64)),
                                  batch_size=int(params.get("batch_size", 256)), device=self.device)
        out = pd.DataFrame({"items": [row.tolist() for row in items], "scores": [row.tolist() for row in scores]})
        if "user_id" in model_input:
            out.insert(0, "user_id", model_input["user_id"].to_numpy())
        return out


mlflow.models.set_model(OneRecPyfunc())
