"""Small argument checks shared by the public functions: each error names the argument."""

from __future__ import annotations

import torch


def check_tensor(name: str, value, *, ndim: int | None = None, dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
    return value


def check_shape(name: str, value: torch.Tensor, shape: tuple) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


INT_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_seed(name: str, seed) -> int:
    """A seed: an int in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{name}: expected an int in [0, 2**63), got {seed}")
    return seed


def seeded_generator(seed: int | None, device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, or, without one, with a seed drawn from
    torch's global generator (so ``torch.manual_seed`` also reproduces a run)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(0, 2**62, (1,))) if seed is None else int(seed))
    return generator


def exclusion_ids(exclude_items, batch_size: int, num_ids: int, device) -> torch.Tensor | None:
    """Per-request item ids to exclude, checked: a list of ``batch_size`` id lists, or an int
    tensor ``[B, X]`` padded with -1, as int64 ``[B, X]`` on ``device`` (-1 padded); None when
    nothing is excluded."""
    if exclude_items is None:
        return None
    if isinstance(exclude_items, torch.Tensor):
        check_tensor("exclude_items", exclude_items, ndim=2, dtypes=INT_DTYPES)
        if exclude_items.shape[0] != batch_size:
            raise ValueError(f"exclude_items: expected {batch_size} rows (one per request), "
                             f"got {exclude_items.shape[0]}")
        ids = exclude_items.to(device=device, dtype=torch.long)
    else:
        rows = list(exclude_items)
        if len(rows) != batch_size:
            raise ValueError(f"exclude_items: expected {batch_size} lists (one per request), got {len(rows)}")
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((batch_size, width), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            if len(row):
                ids[b, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        ids = ids.to(device)
    if ids.numel() and bool(((ids < -1) | (ids >= num_ids)).any()):
        raise ValueError(f"exclude_items: item ids must be in [0, {num_ids}) (the catalog's ids; -1 pads)")
    if ids.numel() == 0 or bool((ids < 0).all()):
        return None
    return ids
