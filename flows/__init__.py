"""Prefect flows of the SEAP pipeline."""
