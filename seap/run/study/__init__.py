"""The quality study behind ``docs/results.md``: one command, every figure, settings chosen on
held-out calibration-side items.

    seap study --data-dir ../shared/benchmarks --out docs

It walks ordinary run plans (:func:`seap.run.plan.make_plan`, executed by
:func:`seap.run.execute.execute`) in one shared, content-addressed work folder, so a study
that is stopped resumes where it stopped and a second run only re-does what changed. Each
finished run of the study (one configuration: a selection candidate, or one compensation at
one sparsity) is also written to a *ledger* (``<out>/results/study-runs/``, one small JSON
file per run: its configuration, results, per-item correctness and KL, the code digest and
commit it was measured with), so a study resumes on another machine, where the work folder
is gone, from the runs a previous machine finished; ``--fresh`` measures everything again.
The steps:

1. **selection** (:func:`selection_data`): each task's *train* split is cut in two (seeded);
   the masks are calibrated on the first part, and every candidate setting of the refit (and
   no refit, and bias compensation) is scored on the second part. The chosen refit is the one
   with the best mean accuracy over the SEAP expert and both logistic-schedule baselines at
   the selection sparsities. No reported item is ever looked at;
2. **rows**: dense; SEAP expert, general and routed; Wanda-sp and FLAP with their own
   allocation and with the logistic schedule; each with no compensation, bias compensation,
   and the chosen least-squares refit; at every study sparsity; on the starter suite (every
   item) and PIQA (every validation item), calibrated on the train splits;
3. **calibration size**: the SEAP expert with 50, 200 and 1,000 records per task (at the
   rows' own size, the rows' SEAP-expert runs are the answer and are not measured again);
4. **analysis** (pure functions of :mod:`seap.evaluation.significance`): 95% intervals,
   paired differences of the SEAP expert against each baseline on the same items, retention
   of the margin over chance, WikiText-2 perplexity of each general mask, and the mean KL
   divergence from dense on held-out text of each task (:mod:`seap.evaluation.divergence`).

Outputs: ``<out>/results/study.json`` (every number), ``<out>/results/study.md`` (the tables)
and ``<out>/results/study-retention.png`` (retention against sparsity with 95% bands).

The modules:

- :mod:`seap.run.study.design`: the methods compared, the compensations, the chance margin;
- :mod:`seap.run.study.ledger`: the finished runs (:class:`StudyRun`) and their ledger
  (matching an entry, reading and writing it);
- :mod:`seap.run.study.analysis`: step 4, every number of the tables from the finished runs;
- :mod:`seap.run.study.study_tables`: the targets, ``study.json``, ``study.md`` and the
  retention plot;
- :mod:`seap.run.study.driver`: the options, the refit candidates, steps 1 to 3 and
  :func:`run_study`.
"""

from seap.run.study.analysis import analyse, mean_or_none, measure_kl, perplexity_by_run, row_correctness
from seap.run.study.design import (BIAS_COMPENSATION, CHANCE_MARGIN, CONTROL, CONTROL_METHODS, NO_COMPENSATION,
                                   SAME_SCHEDULE, SELECTION_METHODS, STUDY_METHODS, Compensation)
from seap.run.study.driver import (DEFAULT_GENERIC, DEFAULT_REFIT_ALPHAS, JOB_EVENTS, StudyOptions, execute_config,
                                   expert_rows, refit_candidates, run_study, select_refit, selection_control,
                                   selection_data, study_run)
from seap.run.study.ledger import (LEDGER_FORMAT, StudyRun, decode_correctness, encode_correctness, ledger_material,
                                   ledger_path, measurement_stamp, read_entry, write_entry)
from seap.run.study.study_tables import plot_retention, study_markdown, targets, write_study

__all__ = ["BIAS_COMPENSATION", "CHANCE_MARGIN", "CONTROL", "CONTROL_METHODS", "DEFAULT_GENERIC",
           "DEFAULT_REFIT_ALPHAS", "JOB_EVENTS", "LEDGER_FORMAT", "NO_COMPENSATION", "SAME_SCHEDULE",
           "SELECTION_METHODS", "STUDY_METHODS", "Compensation", "StudyOptions", "StudyRun", "analyse",
           "decode_correctness", "encode_correctness", "execute_config", "expert_rows", "ledger_material",
           "ledger_path", "mean_or_none", "measure_kl", "measurement_stamp", "perplexity_by_run", "plot_retention",
           "read_entry", "refit_candidates", "row_correctness", "run_study", "select_refit", "selection_control",
           "selection_data", "study_markdown", "study_run", "targets", "write_entry", "write_study"]
