"""Ground: what every layer stands on: configuration, column schema, sketches, shard files.

Imports only the standard library and third-party packages.
"""
