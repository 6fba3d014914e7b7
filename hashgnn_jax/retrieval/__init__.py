"""Retrieval: binary codes packed into words, and top-k search over every item.

`codes` (packing, popcount distance, tie-break order, exclusions), `layout` (how users and items
map onto devices and blocks), `selection` (the counting top-k), `hamming` (Hamming search),
`continuous` (inner-product tile scan), `index.ItemIndex` (the jitted scorer that ties them).
"""
