"""Sweeps: the product of models, tasks, methods, seeds, ablations and selection settings, run
as independent `discover` jobs on a local process pool or a Ray cluster, resumable.

grid.py (torch-free) turns a GRID file into checked Job records; job.py runs one job in a worker
(the same library calls as `circuits discover`); pools.py holds the local and Ray executors;
runner.py drives a sweep (lock, skip what is done, retry, progress, log); report.py writes the
summary and figures.
"""
