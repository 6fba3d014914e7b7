"""Evaluation: HR@n and NDCG@n of the Hamming, hierarchical and continuous rankings.

`metrics` (the cutoff metrics), `evaluate` (encode, rank every user, score), `popularity` (the
host baseline that ranks by an item score), `reporting` (the eval_results.json record).
"""
