"""Class-head rows: the released 91-way COCO-id heads and detectron2's 80 contiguous classes.

The released heads have one row per COCO category id 0..90 (id 0 and the 11 ids COCO does
not use are present but untrained); detectron2 numbers the 80 COCO categories 0..79 in the
order of their ids (``thing_dataset_id_to_contiguous_id``).

The two-stage encoder head is different: it is trained with every label set to 0, so only
its channel 0 scores proposals (the top-k is taken on channel 0). Its mapping keeps row 0
in place; its other rows follow the decoder heads' COCO mapping so every channel keeps a
defined meaning.
"""
from __future__ import annotations

import functools

import torch

__all__ = [
    "NUM_COCO_ID_CLASSES",
    "class_rows",
    "coco_class_names",
    "coco_contiguous_ids",
    "gather_class_rows",
    "scatter_class_rows",
]

#: Rows of a released class head (COCO ids 0..90).
NUM_COCO_ID_CLASSES = 91


@functools.lru_cache(maxsize=1)
def coco_contiguous_ids() -> tuple[int, ...]:
    """The 80 COCO category ids, in detectron2's contiguous order (index = contiguous id)."""
    from detectron2.data import MetadataCatalog

    id_map = MetadataCatalog.get("coco_2017_val").thing_dataset_id_to_contiguous_id
    ids = sorted(id_map, key=id_map.__getitem__)
    assert [id_map[i] for i in ids] == list(range(len(ids))) and len(ids) == 80, id_map
    return tuple(ids)


@functools.lru_cache(maxsize=1)
def coco_class_names() -> tuple[str, ...]:
    """The 80 COCO class names, in detectron2's contiguous order: what a converted
    checkpoint records as its ``thing_classes`` (the 'coco' mapping)."""
    from detectron2.data import MetadataCatalog

    names = tuple(MetadataCatalog.get("coco_2017_val").thing_classes)
    assert len(names) == len(coco_contiguous_ids()), names
    return names


def class_rows(mapping: str, num_rows: int, encoder_head: bool = False) -> list[int]:
    """Rows of a released head that become the rows of ours.

    Args:
        mapping: "coco" (91 COCO-id rows -> 80 contiguous classes) or "identity".
        num_rows: rows of the released head.
        encoder_head: the two-stage proposal head, whose row 0 is kept in place.

    Returns:
        ``rows`` with ``ours[i] = released[rows[i]]``.
    """
    if mapping == "identity":
        return list(range(num_rows))
    if mapping != "coco":
        raise ValueError(f"class mapping must be 'coco' or 'identity', got {mapping!r}")
    if num_rows != NUM_COCO_ID_CLASSES:
        raise ValueError(
            f"the 'coco' class mapping needs a {NUM_COCO_ID_CLASSES}-way class head (one row "
            f"per COCO id), got {num_rows} rows; use the 'identity' mapping to keep the rows"
        )
    rows = list(coco_contiguous_ids())
    if encoder_head:
        rows[0] = 0
    return rows


def gather_class_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``t[rows]`` for a head's weight [C, D] or bias [C]."""
    return t[torch.as_tensor(rows, dtype=torch.long)].clone()


def scatter_class_rows(t: torch.Tensor, rows: list[int], num_rows: int) -> torch.Tensor:
    """The inverse of :func:`gather_class_rows` into a head of ``num_rows`` rows.

    Rows no class maps to get what the released training leaves them near: a zero weight
    and the prior bias ``-log((1 - 0.01) / 0.01)`` (probability 0.01).
    """
    out = t.new_zeros((num_rows,) + tuple(t.shape[1:]))
    if t.dim() == 1:
        out.fill_(-torch.log(torch.tensor((1 - 0.01) / 0.01)).item())
    out[torch.as_tensor(rows, dtype=torch.long)] = t
    return out
