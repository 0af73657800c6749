"""Benchmarks: FedStream against Flower's simulation and a bare PyTorch loop (see README.md)."""
