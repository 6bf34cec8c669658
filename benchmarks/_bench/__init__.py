"""Parts of benchmarks/overhead.py: models, compared steps, timing, memory, breakdown, report."""
