"""laion-dask: rebuild a LAION-5B-style image-text dataset from Common Crawl with Dask."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# the library never configures logging; the CLI and notebooks do
logging.getLogger(__name__).addHandler(logging.NullHandler())
