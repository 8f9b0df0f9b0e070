"""Parallel set-identifier decoding: one forward, then the whole catalog scored with a streaming
top-K (:func:`decoding.ops.catalog_topk`).

- SETRec (:mod:`decoding.setid.setrec`): :func:`setid_generate`, :class:`SetIdCatalog`, and the
  group-id mask and positions.
- RPG (:mod:`decoding.setid.rpg`): per-digit log-probs, exhaustive :func:`rpg_topk`,
  :func:`graph_decode` and the blocked :func:`knn_graph`.
"""

from decoding.setid.rpg import (
    GraphDecodeOutput,
    cosine_digit_logits,
    digit_logprobs,
    graph_decode,
    knn_graph,
    rpg_item_features,
    rpg_topk,
)
from decoding.setid.setrec import (
    ORDINARY,
    QUERY,
    SetIdCatalog,
    query_hidden_states,
    setid_attention_mask,
    setid_generate,
    setid_position_ids,
    setid_visibility,
)

__all__ = ["ORDINARY", "QUERY", "GraphDecodeOutput", "SetIdCatalog", "cosine_digit_logits", "digit_logprobs",
           "graph_decode", "knn_graph", "query_hidden_states", "rpg_item_features", "rpg_topk",
           "setid_attention_mask", "setid_generate", "setid_position_ids", "setid_visibility"]
