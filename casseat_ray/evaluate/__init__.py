"""Evaluation of the student (and optionally the teacher) on benchmarks: ``job`` runs
benchmarks x models x modes on the inference layer, ``items`` turns outputs into scored
items, ``metrics`` and ``report`` make the numbers, tables and plots."""
