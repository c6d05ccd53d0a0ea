"""Products: what a user takes away from a run (dataset, exploration, report, index, models).

Each is a per-partition function plus a merge; :mod:`laion_dask.orchestration.runner` maps it.
"""
