"""The pure maths, on tensors only: exact streaming moments (:mod:`.moments`), activation
statistics as data (:mod:`.statistics`), model geometry (:mod:`.geometry`), importance scores
(:mod:`.scores`), per-layer sparsity schedules (:mod:`.schedules`) and masks (:mod:`.masks`).
Nothing here walks a model."""
