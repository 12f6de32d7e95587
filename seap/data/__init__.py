"""Inputs: calibration corpora (:mod:`.corpus`), the built-in starter suite (:mod:`.starter`)
and the catalogue of evaluation tasks (:mod:`.catalogue`)."""
