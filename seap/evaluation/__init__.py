"""Measuring models: lm-eval and perplexity (:mod:`.harness`), the metrics every report, record
and gate uses (:mod:`.metrics`), speed (:mod:`.speed`), the task router (:mod:`.router`),
routed inference (:mod:`.routed`) and the results report (:mod:`.report`)."""
