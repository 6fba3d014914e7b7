"""Data stage: raw logs and the generated graph in, a split `Dataset` and its graph out.

`formats` (kinds, splits, units) -> `readers` (one table per log) -> `prepare` (remap, filter,
split, cache) or `synthetic` (the planted-community generator) -> `loader.load_dataset` ->
`dataset.Dataset` -> `graph.BipartiteGraph` (CSR adjacency and jraph views).
"""
