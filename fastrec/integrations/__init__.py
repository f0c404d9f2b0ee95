"""Integrations with recommender libraries. Each lives in its own submodule and imports its
library only when that submodule is imported (``import fastrec`` never does)."""
