"""Model stage: the GNN encoder and hash layer, its losses, and full-graph encoding.

`network` (Flax modules and the straight-through sign), `losses` (link reconstruction and
ranking), `encode` (every user and item through the trained network, in edge chunks).
"""
