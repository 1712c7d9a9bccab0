"""Cross-modal retrieval: a shared space for modality pairs and nearest-neighbour search (docs/retrieve.md).

``align.py``: pure torch heads, symmetric InfoNCE, ranks and metrics. ``pipeline.py``: the Ray
shell (`raypipe retrieve fit` with Ray Train, `raypipe retrieve query` with Ray Data and hnswlib).
"""
