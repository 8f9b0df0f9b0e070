"""The workload stack, one home: real interaction data (:mod:`.datasets`), semantic IDs learnt
from it (:mod:`.semantic_ids`), ranking metrics (:mod:`.metrics`) and the recipes that train a
generative recommender on them to measure what decoding options cost in recall
(:mod:`.movielens`). The first three depend on nothing else of the package (the support layer
imports them); the recipes sit above the decoders."""
