"""Model access: architecture adapters (:mod:`.adapters`, the only code that reads or writes a
model's module tree), the loaded model and its fingerprint (:mod:`.loaded`), loading
(:mod:`.loading`), owned hooks (:mod:`.hooks`), statistics collection (:mod:`.calibration`),
applying masks (:mod:`.surgery`) and pruned checkpoints (:mod:`.checkpoint`)."""
