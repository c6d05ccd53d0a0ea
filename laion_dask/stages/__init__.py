"""Stages: plain functions over one pandas partition (extract, language, rules, download, score...).

They add columns and never drop rows; only :mod:`.filters` decides a row's fate, by a named
reason. Stages import only :mod:`laion_dask.ground` and never Dask.
"""
