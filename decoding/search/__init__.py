"""Decoders built on the ops."""

from decoding.search.beam import BeamSearchOutput, beam_search
from decoding.search.model import BeamModel, HFBeamModel, as_beam_model

__all__ = ["BeamModel", "BeamSearchOutput", "HFBeamModel", "as_beam_model", "beam_search"]
