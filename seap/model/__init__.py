"""Model access: architecture adapters (:mod:`.adapters`, the only code that reads or writes a
model's module tree), the loaded model and its fingerprint (:mod:`.loaded`), loading
(:mod:`.loading`), owned hooks (:mod:`.hooks`), statistics collection (:mod:`.calibration`),
applying masks (:mod:`.masking`: any mask by its format, :mod:`.surgery`: heads and channels,
:mod:`.expert_pruning`: experts of an MoE model, :mod:`.pruning`: what they share) and pruned
checkpoints (:mod:`.checkpoint`)."""
