"""The example scripts' plumbing (:mod:`~ibaml.experiments.cli`: options, data loading, run
folders, one-line errors), kept apart from the library's core so that the benchmarks can drive
runs the way the examples do without importing them. Not imported by ``import ibaml``."""
