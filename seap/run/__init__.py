"""Orchestration: the typed run configuration (:mod:`.config`), the method table
(:mod:`.methods`), the planner (:mod:`.plan`), one function per stage (:mod:`.stages`), the
content-addressed executor (:mod:`.execute`), the DVC front door (:mod:`.dvc`), the one-shot
prune (:mod:`.oneshot`) and the console view (:mod:`.progress`)."""
