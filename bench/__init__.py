"""Measuring instruments: `python -m bench` (every backend of an artifact side by side: latency, throughput,
memory, bandwidth, accuracy) and `python -m bench.kernels` (each kernel's implementations over shapes from tiny to
Qwen3-Next's). Both write report.json (schema in bench/schema.py), report.md and PNG charts into one directory."""
