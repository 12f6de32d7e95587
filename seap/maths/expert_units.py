"""Names of the expert scores (torch-free, so that the CLI's option table can list them)."""

EXPERT_SCORES = ("tcess", "frequency", "reap")
DEFAULT_EXPERT_SCORE = "tcess"
CHANNEL_SCORE = "seap-sf"  # how channels inside experts are scored (unit both or neurons of an MoE model)
