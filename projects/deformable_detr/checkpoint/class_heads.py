"""Class heads of a checkpoint loaded into a model with other classes (fine-tuning).

A checkpoint records its class names under ``"thing_classes"`` beside ``"model"`` (this
project's checkpointer and converters write them). When a model's classes differ from the
checkpoint's, in number or in names, every class head ``class_embed.{i}`` is rebuilt to the
model's classes before loading:

- ``"by_name"``: a class whose name matches one of the checkpoint's (case-insensitive, spaces
  at the ends ignored) gets the checkpoint's row (weight and bias); the others get the
  published prior: the weight as the model initialised it, the bias
  ``-log((1 - 0.01) / 0.01)`` (every class starts at probability 0.01).
- ``"reinit"``: every class gets the prior.

The two-stage encoder head (index = number of decoder layers) scores proposals with its
channel 0 whatever the class (it is trained with every label set to 0), so that row is kept
from the checkpoint in both modes; its other rows follow the rule above.

Everything else in the checkpoint is left as it is. :func:`adapt_class_heads` returns a
:class:`ClassHeadReport` whose :meth:`~ClassHeadReport.message` is the one log line that says
what was copied and what was initialised.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Optional

import numpy as np
import torch

from .atomic_io import atomic_torch_save
from .safe_load import CheckpointError, load_torch_file

__all__ = [
    "CLASS_HEAD_INITS",
    "HOW_TO_NAME",
    "PRIOR_PROB",
    "ClassHeadReport",
    "adapt_class_heads",
    "add_class_names",
    "checkpoint_class_names",
    "class_head_keys",
    "match_by_name",
    "prior_bias",
]

#: Values of ``MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT``.
CLASS_HEAD_INITS = ("by_name", "reinit")
#: The focal-loss prior of the published initialisation (see ``modeling/heads.py``).
PRIOR_PROB = 0.01

# class_embed.{i}.weight / .bias, also under a prefix (e.g. a wrapper's "module.").
_HEAD_KEY = re.compile(r"^(?P<head>(?:.*\.)?class_embed\.(?P<index>\d+))\.(?P<param>weight|bias)$")

#: Where to get class names for a checkpoint that has none (the end of the warnings).
HOW_TO_NAME = (
    "checkpoints written by this project's training record them, tools/convert_weights.py "
    "writes COCO's 80 names, and deformable_detr.checkpoint.add_class_names(path, names) adds "
    "them to any checkpoint file"
)


def prior_bias(prior_prob: float = PRIOR_PROB) -> float:
    """The class bias at which the sigmoid is ``prior_prob``: ``-log((1 - p) / p)``."""
    return -math.log((1 - prior_prob) / prior_prob)


def _norm(name: str) -> str:
    return name.strip().casefold()


def match_by_name(model_names: Sequence[str], checkpoint_names: Sequence[str]
                  ) -> list[Optional[int]]:
    """For each model class, the index of the checkpoint class of the same name
    (case-insensitive; the first one if the checkpoint repeats a name), or None."""
    index: dict[str, int] = {}
    for i, n in enumerate(checkpoint_names):
        index.setdefault(_norm(n), i)
    return [index.get(_norm(n)) for n in model_names]


def class_head_keys(keys) -> dict[str, dict[str, str]]:
    """The class heads among state-dict ``keys``: ``{"class_embed.3": {"weight": key,
    "bias": key}}``, in key order."""
    heads: dict[str, dict[str, str]] = {}
    for k in keys:
        m = _HEAD_KEY.match(k)
        if m:
            heads.setdefault(m.group("head"), {})[m.group("param")] = k
    return heads


def _head_index(head: str) -> int:
    return int(head.rsplit(".", 1)[1])


def checkpoint_class_names(data: Mapping[str, Any], num_rows: Optional[int] = None
                           ) -> tuple[Optional[list[str]], str]:
    """The class names a checkpoint dict records (``data["thing_classes"]``).

    Args:
        num_rows: rows of the checkpoint's class heads, to check the names against.

    Returns:
        (names or None, why there are none: "" when there are, else a phrase for a warning).
    """
    names = data.get("thing_classes")
    if names is None:
        return None, "records no class names ('thing_classes')"
    if (not isinstance(names, (list, tuple)) or not names
            or not all(isinstance(n, str) for n in names)):
        return None, "has a 'thing_classes' entry that is not a list of class names"
    if num_rows is not None and len(names) != num_rows:
        return None, (f"names {len(names)} classes in 'thing_classes' but its class heads "
                      f"have {num_rows} rows")
    return list(names), ""


@dataclasses.dataclass
class ClassHeadReport:
    """What :func:`adapt_class_heads` did."""

    #: "by_name" or "reinit": the rule applied (``reinit`` also when names were missing).
    mode: str
    #: The model's classes (its names, or "class i" when it has none).
    model_classes: list[str]
    #: The checkpoint's class count and names (None when it records none).
    checkpoint_rows: int
    checkpoint_classes: Optional[list[str]]
    #: (model class, checkpoint class) pairs whose rows were copied.
    copied: list[tuple[str, str]]
    #: Model classes set to the prior.
    initialised: list[str]
    #: The heads rebuilt (``class_embed.0`` ...) and the two-stage encoder head among them.
    heads: list[str]
    encoder_head: Optional[str] = None
    #: Why names could not be matched ("" when they were, or were not asked for).
    missing_names: str = ""

    def message(self, source: str = "MODEL.WEIGHTS") -> str:
        """One line: the classes on both sides, what was copied and what initialised."""
        ckpt = (f"{self.checkpoint_rows} classes" if self.checkpoint_classes is None else
                f"{self.checkpoint_rows} classes ({_names(self.checkpoint_classes)})")
        if self.copied:
            pairs = [m if m == c else f"{m} <- {c}" for m, c in self.copied]
            copied = f"copied the rows of {len(self.copied)} ({_names(pairs)})"
        else:
            copied = "copied none"
        init = (f"initialised {len(self.initialised)} to the prior "
                f"({_names(self.initialised)})" if self.initialised else "initialised none")
        heads = _heads(self.heads)
        enc = (f"; the two-stage encoder head {self.encoder_head} keeps its proposal-scoring "
               "row 0" if self.encoder_head else "")
        return (f"Class heads ({self.mode}): {source} has {ckpt}, this model "
                f"{len(self.model_classes)} ({_names(self.model_classes)}): {copied}, {init}; "
                f"in {heads}{enc}. Every other tensor loads unchanged")


def _names(names: Sequence[str], limit: int = 12) -> str:
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _heads(heads: Sequence[str]) -> str:
    """``class_embed.{0..5}`` for consecutive heads of one prefix, else the list."""
    prefixes = {h.rsplit(".", 1)[0] for h in heads}
    ids = sorted(_head_index(h) for h in heads)
    if len(prefixes) == 1 and len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{prefixes.pop()}.{{{ids[0]}..{ids[-1]}}}"
    return ", ".join(heads)


def _tensor(v) -> torch.Tensor:
    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v


def adapt_class_heads(checkpoint_sd: MutableMapping[str, Any],
                      model_sd: Mapping[str, torch.Tensor], *,
                      checkpoint_names: Optional[Sequence[str]],
                      model_names: Optional[Sequence[str]],
                      mode: str = "by_name",
                      encoder_head_index: Optional[int] = None,
                      missing_checkpoint_names: str = "records no class names"
                      ) -> Optional[ClassHeadReport]:
    """Rebuild the class heads of ``checkpoint_sd`` (in place) for the model's classes.

    Nothing changes when the heads have the model's shapes and the names are the same (or
    unknown on a side). The heads are rebuilt when their row counts differ, or both sides
    have names that differ (in number, order or spelling other than case).

    Args:
        checkpoint_sd: the checkpoint's state dict, names as the model's; class heads
            ``*class_embed.{i}.weight`` [C_ckpt, D] and ``.bias`` [C_ckpt].
        model_sd: the model's state dict; its class heads [C, D] and [C] hold the values the
            model was initialised with (the prior rows' weights are taken from it).
        checkpoint_names, model_names: class names ([C_ckpt], [C]) or None.
        mode: "by_name" or "reinit" (see the module's doc). "by_name" without names on both
            sides falls back to "reinit" (:attr:`ClassHeadReport.missing_names` says why).
        encoder_head_index: index of the two-stage encoder head (None: one-stage).
        missing_checkpoint_names: why the checkpoint has no names, for the report.

    Returns:
        what was done, or None when nothing was (also when a head's width D differs: that is
        another model, which the loader reports).
    """
    if mode not in CLASS_HEAD_INITS:
        raise ValueError(f"MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT must be one of "
                         f"{CLASS_HEAD_INITS}, got {mode!r}")
    heads = {h: ps for h, ps in class_head_keys(model_sd).items()
             if set(ps) == {"weight", "bias"} and all(k in checkpoint_sd for k in ps.values())}
    if not heads:
        return None
    for ps in heads.values():
        cw, mw = _tensor(checkpoint_sd[ps["weight"]]), model_sd[ps["weight"]]
        cb, mb = _tensor(checkpoint_sd[ps["bias"]]), model_sd[ps["bias"]]
        if (cw.dim() != 2 or cw.shape[1:] != mw.shape[1:] or cb.shape != cw.shape[:1]
                or mb.shape != mw.shape[:1]):
            return None
    decoder = [h for h in heads if _head_index(h) != encoder_head_index] or list(heads)
    ckpt_rows = int(_tensor(checkpoint_sd[heads[decoder[0]]["weight"]]).shape[0])
    num_classes = int(model_sd[heads[decoder[0]]["weight"]].shape[0])
    if checkpoint_names is not None and len(checkpoint_names) != ckpt_rows:
        checkpoint_names = None
    if model_names is not None and len(model_names) != num_classes:
        model_names = None
    shapes_differ = any(_tensor(checkpoint_sd[k]).shape != model_sd[k].shape
                        for ps in heads.values() for k in ps.values())
    names_differ = (checkpoint_names is not None and model_names is not None
                    and [_norm(n) for n in checkpoint_names] != [_norm(n) for n in model_names])
    if not shapes_differ and not names_differ:
        return None

    missing = ""
    if mode == "by_name" and (checkpoint_names is None or model_names is None):
        missing = ("the checkpoint " + missing_checkpoint_names if checkpoint_names is None
                   else "this model's dataset has no class names (thing_classes)")
        mode = "reinit"
    shown = list(model_names) if model_names is not None else [f"class {i}"
                                                               for i in range(num_classes)]
    if mode == "by_name":
        rows = match_by_name(model_names, checkpoint_names)
    else:
        rows = [None] * num_classes
    bias0 = prior_bias()
    for head, ps in heads.items():
        mw, mb = model_sd[ps["weight"]], model_sd[ps["bias"]]
        cw = _tensor(checkpoint_sd[ps["weight"]]).to(mw.dtype)
        cb = _tensor(checkpoint_sd[ps["bias"]]).to(mb.dtype)
        # The prior: the weight as initialised, the bias at probability PRIOR_PROB.
        w = mw.detach().clone().cpu()
        b = torch.full_like(mb.detach().cpu(), bias0)
        for j, i in enumerate(rows):
            if i is not None:
                w[j], b[j] = cw[i], cb[i]
        if _head_index(head) == encoder_head_index:
            # Channel 0 scores the encoder's proposals whatever the class.
            w[0], b[0] = cw[0], cb[0]
        checkpoint_sd[ps["weight"]], checkpoint_sd[ps["bias"]] = w, b
    encoder = next((h for h in heads if _head_index(h) == encoder_head_index), None)
    return ClassHeadReport(
        mode=mode, model_classes=shown, checkpoint_rows=ckpt_rows,
        checkpoint_classes=list(checkpoint_names) if checkpoint_names is not None else None,
        copied=[(shown[j], checkpoint_names[i]) for j, i in enumerate(rows) if i is not None],
        initialised=[shown[j] for j, i in enumerate(rows) if i is None],
        heads=list(heads), encoder_head=encoder, missing_names=missing,
    )


def add_class_names(path: str, names: Sequence[str], output: Optional[str] = None) -> None:
    """Record ``names`` (one per class-head row, in row order) as the ``"thing_classes"``
    of the checkpoint file ``path`` (or of a copy, ``output``), so that fine-tuning can
    copy the rows of the classes a dataset shares with it.

    The file is read without running code stored in it and written atomically.

    Raises:
        CheckpointError: unreadable files, or names that do not fit its class heads.
    """
    data = load_torch_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a checkpoint dict")
    if "model" not in data:
        data = {"model": data}
    heads = class_head_keys(data["model"])
    rows = {int(_tensor(data["model"][ps["weight"]]).shape[0]) for ps in heads.values()
            if "weight" in ps}
    names = [str(n) for n in names]
    if heads and len(names) not in rows:
        raise CheckpointError(f"{len(names)} names for class heads of {sorted(rows)} rows in "
                              f"{path}: give one name per row, in row order")
    data["thing_classes"] = names
    atomic_torch_save(data, output or path)
