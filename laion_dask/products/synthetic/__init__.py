"""A synthetic Common-Crawl-like corpus: pictures drawn with captions in four languages.

The offline demo serves it and ``laion-dask train-clip build-demo`` trains the demo CLIP on a
disjoint draw of it, so it lives below both (a product may not import a face).
"""
