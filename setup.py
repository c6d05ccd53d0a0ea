"""Build script for the optional C fast paths; everything else is in pyproject.toml.

``laion_dask.stages.extract._speedups`` is ``optional``: without a C compiler (or Python headers) the
install still succeeds and extraction runs its pure-Python twin, with the same output, slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "laion_dask.stages.extract._speedups",
            ["laion_dask/stages/extract/_speedups.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
