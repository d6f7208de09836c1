"""The benchmark of issue #5 (not part of the package): python -m bench.run."""
