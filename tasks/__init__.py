"""Prefect tasks: one per pipeline stage, each a thin wrapper over a ``seap.run.stages`` function."""
