"""The Hugging Face adapter of the model protocol: its step logits equal a plain, uncached
forward of the full sequences, whether beams stay within their request (the prompt-sharing
reorder) or move across requests (the full-copy reorder)."""

from __future__ import annotations

import pytest
import torch

from conftest import SID_VOCAB, prompts
from decoding.search.model import BeamModel, HFBeamModel, as_beam_model


def uncached_next_logits(model, ids, mask, continuation):
    """Next-token logits of each prompt row followed by its continuation tokens, no cache."""
    full_ids = torch.cat([ids, continuation], dim=1)
    if model.config.is_encoder_decoder:
        start = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
        dec = torch.cat([start, continuation], dim=1)
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1].float()
    full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    pos = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
    return model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits[:, -1].float()


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_step_logits_match_an_uncached_forward(sid_models, arch):
    model = sid_models[arch]
    adapter = as_beam_model(model)
    assert isinstance(adapter, HFBeamModel) and isinstance(adapter, BeamModel)
    ids, mask = prompts(SID_VOCAB, batch=2, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = adapter.prefill(ids, mask)
        assert torch.allclose(first, uncached_next_logits(model, ids, mask, ids[:, :0]), atol=1e-4)
        # fan out: 3 beams per request
        rows = torch.tensor([0, 0, 0, 1, 1, 1])
        history = torch.randint(8, SID_VOCAB, (6, 1), generator=g)
        got = adapter.step(rows, history[:, 0])
        assert torch.allclose(got, uncached_next_logits(model, ids[rows], mask[rows], history), atol=1e-4)
        # within-request reorder (prompt KV shared), then a cross-request one (full copy)
        for parent in (torch.tensor([2, 0, 0, 4, 5, 3]), torch.tensor([3, 4, 0, 1, 2, 5])):
            origin = rows[parent]
            new = torch.randint(8, SID_VOCAB, (6, 1), generator=g)
            history = torch.cat([history[parent], new], dim=1)
            rows = origin
            got = adapter.step(parent, new[:, 0])
            expected = uncached_next_logits(model, ids[rows], mask[rows], history)
            assert torch.allclose(got, expected, atol=1e-4)


def test_as_beam_model_rejects_other_objects():
    with pytest.raises(TypeError, match="model: expected a Hugging Face model or an object with prefill"):
        as_beam_model(object())
