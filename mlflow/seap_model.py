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
Params: ``max_new_tokens`` (default 32), ``batch_size`` (default 16), ``task`` (an expert to use
instead of the router's choice). A request that cannot be answered (no prompts, an empty or
over-long prompt, an unknown task, a bad count) gets HTTP 400 with what is wrong. ``SEAP_BASE_MODEL`` overrides where the base model is
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
        """Answer a request; one that cannot be answered is refused as a bad request (HTTP 400 when
        served), with what is wrong and what to send instead."""
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from seap.errors import SeapError

        try:
            prompts = _prompts(model_input)
            params = dict(params or {})
            max_new_tokens = _whole(params.get("max_new_tokens", 32), "max_new_tokens")
            batch_size = _whole(params.get("batch_size", 16), "batch_size")
            task = params.get("task") or None
            answers = self.model.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, task=task)
        except SeapError as exc:
            raise MlflowException(f"{exc.problem}; {exc.fix}" if exc.fix else exc.problem,
                                  error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(answers, columns=["text", "expert", "confidence"])


def _whole(value: Any, name: str) -> int:
    from seap.errors import SeapError

    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise SeapError(f"{name} must be a whole number, got {value!r}", f"pass e.g. {name}: 16")


def _prompts(model_input: Any) -> list[str]:
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return _prompts(model_input[column].tolist())
    if isinstance(model_input, dict):
        values = model_input.get("prompt", model_input.get("inputs"))
        return _prompts(values)
    if isinstance(model_input, (list, tuple)):
        from seap.errors import SeapError

        for i, value in enumerate(model_input):
            if not isinstance(value, str):
                raise SeapError(f"prompt {i} is a {type(value).__name__}, not a string",
                                'send {"inputs": ["a prompt", ...]}')
        return list(model_input)
    from seap.errors import SeapError

    raise SeapError(f"expected prompts as a list of strings or a DataFrame, got {type(model_input).__name__}",
                    'send {"inputs": ["a prompt", ...]}')


mlflow.models.set_model(SeapExpertModel())
