"""Orchestration: the only layer that talks to Dask.

Graph building and the stage runners (:mod:`.pipeline`), the task runner products use
(:mod:`.runner`), clusters (:mod:`.cluster`) and the run directory with its checkpoints
(:mod:`.rundir`).
"""
