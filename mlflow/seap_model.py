"""The MLflow pyfunc model of a registered SEAP expert (MLflow "model from code").

Registration (``mlflow/seap_registry.py``) logs this file as ``python_model`` with one
artifact, ``bundle``: the expert's masks, the router of a routed bundle, and a reference to
the base model with its fingerprint (``seap/bundle.py``), never a copy of the base weights.
Loading the version loads the base model, checks its fingerprint and derives the pruned
expert from it (for a routed bundle: every expert, lazily, and the router)::

    model = mlflow.pyfunc.load_model("models:/seap-smollm2-135m-capitals@production")
    model.predict(["The capital of France is"], params={"max_new_tokens": 8})
    # -> DataFrame with columns text, expert, confidence

    mlflow models serve -m "models:/seap-smollm2-135m-routed@production" --env-manager local -p 5010
    curl -X POST localhost:5010/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": ["The capital of France is"], "params": {"max_new_tokens": 8}}'

Input: a list of prompts (or a one-column DataFrame, or a column named ``prompt``). A routed
bundle routes the whole request, groups the prompts by expert and generates each group in
batches (``batch_size``, default 16), answering in input order.
Params: ``max_new_tokens`` (default 32), ``batch_size`` (default 16). ``SEAP_BASE_MODEL`` overrides where the base model is
read from (the fingerprint is still checked); ``SEAP_DEVICE`` picks the device (default auto);
``SEAP_EXPERT_CACHE`` caps how many experts of a routed bundle stay materialised (default: all,
so a mixed batch derives each expert once per process, not once per request).
"""

from __future__ import annotations

import os
from typing import Any

from mlflow.pyfunc import PythonModel

import mlflow


class SeapExpertModel(PythonModel):
    """A pruned expert (or routed bundle) rebuilt from its masks and the referenced base model."""

    def load_context(self, context: Any) -> None:
        from seap.registry.bundle import load_bundle

        self.model = load_bundle(context.artifacts["bundle"], device=os.environ.get("SEAP_DEVICE", "auto"))

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (no hints: MLflow would treat them as a schema)
        import pandas as pd

        prompts = _prompts(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens", 32))
        batch_size = int((params or {}).get("batch_size", 16))
        return pd.DataFrame(self.model.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size),
                            columns=["text", "expert", "confidence"])


def _prompts(model_input: Any) -> list[str]:
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column].tolist()]
    if isinstance(model_input, dict):
        values = model_input.get("prompt", model_input.get("inputs"))
        return _prompts(values)
    if isinstance(model_input, (list, tuple)):
        return [str(v) for v in model_input]
    raise TypeError(f"expected prompts as a list of strings or a DataFrame, got {type(model_input).__name__}")


mlflow.models.set_model(SeapExpertModel())
