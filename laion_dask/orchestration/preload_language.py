"""A fork server preload (:func:`laion_dask.orchestration.cluster.start_worker_server`): importing
this module loads the default language model.

``laion-dask extract`` has its local cluster's fork server import it, so the model is read once
there and every forked worker shares its arrays (copy-on-write, read only), instead of each
worker reading it on its first task: py3langid decompresses its model file, ~0.6 s CPU and
~96 MB per worker. A run configured with another backend or English prior loads its own on the
workers, as before.
"""

from __future__ import annotations

from laion_dask.ground.config import LanguageConfig
from laion_dask.stages.language import load_language_model

DEFAULT = LanguageConfig()
load_language_model(DEFAULT.backend, DEFAULT.english_prior)
