"""fusec benchmarks: ``python -m bench.cpu`` (every change) and ``python -m bench.gpu`` (one GPU run)."""
