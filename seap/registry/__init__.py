"""Publishing experts: registry records (:mod:`.records`), self-contained bundles
(:mod:`.bundle`), promotion gates (:mod:`.promotion`), and the loader of the MLflow code kept
outside the library (:mod:`.mlflow_code`)."""
