"""Benchmarks of the trainer, the loaders and data_prep: `make bench`. Above both packages: it imports each."""
