"""Prefect tasks: the one task that runs a job of the plan (``tasks.stages``), named after its stage."""
