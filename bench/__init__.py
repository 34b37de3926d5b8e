"""Benchmarks of goldstone (docs/benchmarks.md records their results and the commands)."""

from goldstone_cli.omp import prefer_passive_wait

prefer_passive_wait()  # as the goldstone command does: before torch is imported (goldstone_cli/omp.py)
