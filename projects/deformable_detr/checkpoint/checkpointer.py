"""detectron2's checkpointer made safe to use on untrusted or damaged files.

- Loading runs no code stored in a file (:mod:`.safe_load`), whatever torch's
  environment variables say.
- Saving writes ``<file>.tmp`` and renames it into place (:mod:`.atomic_io`):
  a kill mid-write leaves the previous checkpoint intact.
- Resuming verifies the checkpoint it picks and falls back to the newest readable one.
- :func:`load_inference_weights` refuses weights that leave the model partly random.
- Saving records the training dataset's class names (``"thing_classes"``); loading weights
  of other classes rebuilds the class heads for the model's classes
  (``MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT``, :mod:`.class_heads`).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from fvcore.common.checkpoint import _strip_prefix_if_present

from .atomic_io import atomic_torch_save, atomic_write_text
from .class_heads import (
    CLASS_HEAD_INITS,
    HOW_TO_NAME,
    ClassHeadReport,
    adapt_class_heads,
    checkpoint_class_names,
    class_head_keys,
)
from .safe_load import CheckpointError, load_pickle_weights, load_torch_file

__all__ = [
    "ALLOWED_MISSING",
    "SafeDetectionCheckpointer",
    "class_head_options",
    "dataset_class_names",
    "load_inference_weights",
    "load_pickle_weights",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

#: Model state-dict entries that may be absent from weights used for inference: they are not
#: learned (the config sets the pixel statistics; BatchNorm counters are unused).
ALLOWED_MISSING = (r"^pixel_(mean|std)$", r"(^|\.)num_batches_tracked$")

#: Tells users how to run anyway; the API's argument is ``allow_random_weights``.
_OVERRIDE = "--allow-random-weights"
_SAVE_HINT = ("save a dict holding the state dict: torch.save({'model': model.state_dict()}, "
              "path)")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint file into detectron2's layout, ``{"model": state dict, ...}``,
    without running code stored in it.

    ``.pkl`` files are detectron2 / Detectron / Caffe2 model-zoo pickles of numpy arrays
    (converted as detectron2 does); anything else is a ``torch.save`` file, either a
    checkpoint dict with a ``"model"`` entry or a bare state dict.

    Raises:
        CheckpointError: missing, empty, truncated, corrupt or unsafe files, and files that
            hold something other than a state dict.
    """
    if path.endswith(".pkl"):
        data = load_pickle_weights(path)
        if "model" in data and "__author__" in data:
            logger.info(f"Reading a file from '{data['__author__']}'")
        else:
            # Caffe2 / Detectron1 model zoo, as detectron2 reads it.
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            data = {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
    else:
        data = load_torch_file(path)
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of named "
                                  f"tensors; {_SAVE_HINT}")
        if "model" not in data:
            data = {"model": data}
    _check_state_dict(data["model"], path)
    return data


def _check_state_dict(sd: Any, path: str) -> None:
    if not isinstance(sd, dict):
        raise CheckpointError(f"the 'model' entry of {path} is a {type(sd).__name__}, not a "
                              f"state dict; {_SAVE_HINT}")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, (torch.Tensor, np.ndarray)):
            raise CheckpointError(f"entry {k!r} of the state dict in {path} is a "
                                  f"{type(v).__name__}, not a tensor; {_SAVE_HINT}")


# ----------------------------------------------------------------------------- class names
ClassNames = Union[Sequence[str], Callable[[], Optional[Sequence[str]]], None]


def _json_class_names(json_file: str) -> Optional[List[str]]:
    """The class names of a COCO-format json, in the order detectron2's ``load_coco_json``
    gives them (by category id), without building its index."""
    with open(json_file) as f:
        cats = json.load(f).get("categories") or []
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])] or None


def dataset_class_names(cfg) -> Optional[List[str]]:
    """The model's class names: ``thing_classes`` of ``DATASETS.TRAIN[0]``, else of
    ``DATASETS.TEST[0]``; None when neither has ``NUM_CLASSES`` of them.

    A COCO-format dataset registered with ``register_coco_instances`` gets its names when
    its json is read; if that has not happened yet, the names are read from the json's
    categories (the dataset itself is not loaded).
    """
    num_classes = cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES
    for name in list(cfg.DATASETS.TRAIN[:1]) + list(cfg.DATASETS.TEST[:1]):
        meta = MetadataCatalog.get(name)
        names = meta.get("thing_classes", None)
        json_file = meta.get("json_file", None)
        if names is None and json_file and name in DatasetCatalog.list():
            try:
                names = _json_class_names(json_file)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                logger.debug(f"No class names from {json_file}: {e}")
        if names is not None and len(names) == num_classes:
            return list(names)
    return None


def class_head_options(cfg) -> Dict[str, Any]:
    """Keyword arguments of :class:`SafeDetectionCheckpointer` and
    :func:`load_inference_weights` for a config: the model's class names (looked up when
    first needed, see :func:`dataset_class_names`) and ``CLASS_HEAD_INIT``.

    Raises:
        ValueError: an unknown ``MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT``.
    """
    mode = cfg.MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT
    if mode not in CLASS_HEAD_INITS:
        raise ValueError(f"MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT must be one of "
                         f"{CLASS_HEAD_INITS}, got {mode!r}")
    return {"class_names": lambda: dataset_class_names(cfg), "class_head_init": mode}


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that runs no pickled code, writes atomically and
    resumes from the newest readable checkpoint.

    Loading: see :func:`read_checkpoint`. Saving: ``<name>.pth`` and ``last_checkpoint`` are
    written to a temporary file each and renamed into place. Resuming (``has_checkpoint`` /
    ``get_checkpoint_file``): the file named in ``last_checkpoint`` is read in full first; if
    it is missing, damaged or ``last_checkpoint`` is empty, the other ``model_*.pth`` files
    of ``save_dir`` are tried, newest first, with a warning. Everything else (model-zoo name
    matching, DDP handling, checkpointables) is detectron2's.

    Class names (``class_names``: the model's, or a function returning them when first
    needed; :func:`class_head_options` makes both arguments from a config): saving writes
    them as ``"thing_classes"`` beside ``"model"``. Loading a file whose class heads have
    other classes (in number, or in names when both sides have names) rebuilds the heads
    for the model's classes first, as ``class_head_init`` says ("by_name": the rows of the
    classes named alike are copied, the others start from the prior; "reinit": all start
    from the prior; see :mod:`.class_heads`), with one log line instead of a
    warning per tensor.

    After each load, :attr:`unloaded` lists the model's state-dict entries the file did not
    fill (missing, or of another shape), :attr:`incorrect_shapes` the shape mismatches,
    :attr:`matched` how many names of the file are names of the model (None for model-zoo
    files, whose names are converted) and :attr:`class_heads` what was done to the class
    heads (None: loaded as they were).
    """

    def __init__(self, model, save_dir: str = "", *, save_to_disk: Optional[bool] = None,
                 class_names: ClassNames = None, class_head_init: str = "by_name",
                 **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        if class_head_init not in CLASS_HEAD_INITS:
            raise ValueError(f"class_head_init must be one of {CLASS_HEAD_INITS}, got "
                             f"{class_head_init!r}")
        self.class_head_init = class_head_init
        self._class_names = class_names
        self.class_heads: Optional[ClassHeadReport] = None
        self._loading = ""
        # (path, data) of the checkpoint get_checkpoint_file verified, read once.
        self._verified: Optional[Tuple[str, Dict[str, Any]]] = None
        self._warned_empty_tag = False
        self.unloaded: List[str] = []
        self.incorrect_shapes: List[Tuple[str, tuple, tuple]] = []
        self.matched: Optional[int] = None

    @property
    def class_names(self) -> Optional[List[str]]:
        """The model's class names (None when unknown); a function given as ``class_names``
        is called until it returns names."""
        names = self._class_names
        if callable(names):
            names = names()
            if names is not None:
                self._class_names = names
        return list(names) if names is not None else None

    # ------------------------------------------------------------------------- loading
    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """detectron2's ``load``, with the options a path or URL may end with read here, on
        every detectron2 version: ``?matching_heuristics=True`` loads by detectron2's name
        matching (e.g. ``.../mae_pretrain_vit_base.pth?matching_heuristics=True``); any other
        option is refused. A load that fails leaves nothing behind for the next one."""
        path, self._matching_heuristics = _split_load_options(path)
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._matching_heuristics = False
            if hasattr(self, "_parsed_url_during_load"):
                # detectron2 > 0.6 keeps the URL being loaded here, clears it only when the
                # load succeeds, and asserts it is clear when the next load starts.
                self._parsed_url_during_load = None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        if self._verified is not None and _same_file(self._verified[0], filename):
            data, self._verified = self._verified[1], None
        else:
            data = read_checkpoint(filename)
        if getattr(self, "_matching_heuristics", False):
            data["matching_heuristics"] = True
        return data

    def _load_model(self, checkpoint: Dict[str, Any]):
        # Names the file shares with the model (model-zoo files are renamed while loading).
        self.matched = (None if checkpoint.get("matching_heuristics", False) else
                        len(set(checkpoint["model"]) & set(self.model.state_dict())))
        self.class_heads = None
        if not checkpoint.get("matching_heuristics", False):
            self._adapt_class_heads(checkpoint)
        incompatible = super()._load_model(checkpoint)
        self.incorrect_shapes = [(k, tuple(a), tuple(b))
                                 for k, a, b in incompatible.incorrect_shapes]
        self.unloaded = list(incompatible.missing_keys) + [k for k, _, _ in
                                                           self.incorrect_shapes]
        return incompatible

    def _adapt_class_heads(self, checkpoint: Dict[str, Any]) -> None:
        sd = checkpoint["model"]
        # As detectron2 does next: names saved from a DistributedDataParallel wrapper.
        _strip_prefix_if_present(sd, "module.")
        model_sd = self.model.state_dict()
        heads = class_head_keys(k for k in model_sd if k in sd)
        if not heads:
            return
        first = next((ps["weight"] for ps in heads.values() if "weight" in ps), None)
        rows = np.shape(sd[first])[0] if first is not None else None
        ckpt_names, why = checkpoint_class_names(checkpoint, rows)
        if ckpt_names is None and checkpoint.get("thing_classes") is not None:
            logger.warning(f"{self._loading} {why}; its class names are not used")
        shapes_differ = any(tuple(np.shape(sd[k])) != tuple(model_sd[k].shape)
                            for ps in heads.values() for k in ps.values())
        # Model names are looked up only when they can matter (they may read a json).
        model_names = self.class_names if (ckpt_names is not None or shapes_differ) else None
        two_stage = getattr(self.model, "two_stage", None)
        if two_stage is None:
            two_stage = "transformer.enc_output.weight" in model_sd
        encoder = max(int(h.rsplit(".", 1)[1]) for h in heads) if two_stage else None
        report = adapt_class_heads(sd, model_sd, checkpoint_names=ckpt_names,
                                   model_names=model_names, mode=self.class_head_init,
                                   encoder_head_index=encoder, missing_checkpoint_names=why)
        if report is None:
            return
        self.class_heads = report
        logger.info(report.message(self._loading or "the checkpoint"))
        if report.missing_names:
            fix = (f"To copy the rows of the classes it shares with this model, give the file "
                   f"its class names: {HOW_TO_NAME}" if ckpt_names is None else
                   "Give the dataset its class names (thing_classes in its metadata, or the "
                   "categories of its COCO json)")
            logger.warning(f"MODEL.WEIGHTS {self._loading}: {report.missing_names}, so its "
                           f"class heads ({report.checkpoint_rows} classes) cannot be matched "
                           f"by name to this model's {len(report.model_classes)} classes: every "
                           f"class starts from the prior (reinit). {fix}")

    # ------------------------------------------------------------------------- saving
    def _local(self) -> bool:
        # Atomic renames need a local directory; other PathManager back-ends keep
        # detectron2's direct writes.
        return bool(self.save_dir) and "://" not in self.save_dir

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` (model, checkpointables and ``kwargs``) atomically,
        then name it in ``last_checkpoint``."""
        if not self._local():
            names = self.class_names
            extra = {"thing_classes": names} if names is not None else {}
            return super().save(name, **{**extra, **kwargs})
        if not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        names = self.class_names
        if names is not None:
            # Fine-tuning from this file copies the rows of the classes named alike.
            data["thing_classes"] = names
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    # ------------------------------------------------------------------------- resuming
    def _resume_candidates(self) -> List[str]:
        """The file named in ``last_checkpoint``, then the other ``model_*.pth``, newest
        first."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        named = ""
        if os.path.isfile(tag):
            with open(tag) as f:
                named = f.read().strip()
            if not named and not self._warned_empty_tag:
                self._warned_empty_tag = True
                logger.warning(f"{tag} is empty (a crash while it was written?); looking for "
                               f"the newest readable model_*.pth in {self.save_dir} instead")
        others = sorted(glob.glob(os.path.join(glob.escape(self.save_dir), "model_*.pth")),
                        key=lambda p: (os.path.getmtime(p), p), reverse=True)
        first = [os.path.join(self.save_dir, named)] if named else []
        return first + [p for p in others if not first or not _same_file(p, first[0])]

    def has_checkpoint(self) -> bool:
        """Whether ``save_dir`` has a checkpoint to resume from: ``last_checkpoint`` names
        one, or there are ``model_*.pth`` files."""
        if not self._local():
            return super().has_checkpoint()
        return bool(self._resume_candidates())

    def get_checkpoint_file(self) -> str:
        """The newest readable checkpoint of ``save_dir``, read in full to verify it (the
        data is kept for the load that follows).

        Raises:
            CheckpointError: there are checkpoints but none of them is readable.
        """
        if not self._local():
            return super().get_checkpoint_file()
        self._verified = None
        skipped = []
        for path in self._resume_candidates():
            if not os.path.isfile(path):
                skipped.append(f"{path} does not exist")
                logger.warning(f"last_checkpoint names {path}, which does not exist; trying "
                               "the newest other checkpoint")
                continue
            try:
                data = read_checkpoint(path)
            except CheckpointError as e:
                skipped.append(str(e))
                logger.warning(f"Skipping a checkpoint that cannot be resumed from: {e}. "
                               "Trying the next newest one")
                continue
            if skipped:
                logger.warning(f"Resuming from {path}, the newest readable checkpoint (skipped "
                               f"{len(skipped)} damaged or missing file(s))")
            self._verified = (path, data)
            return path
        if not skipped:
            return ""
        raise CheckpointError(
            f"No readable checkpoint to resume from in {self.save_dir}: "
            + "; ".join(skipped)
            + ". Move the damaged files away to start from MODEL.WEIGHTS, or train in a new "
            "OUTPUT_DIR"
        )

    def ensure_final_model(self, iteration: int, max_iter: int,
                           name: str = "model_final") -> str:
        """After resuming a run whose ``max_iter`` is already reached: keep
        ``<name>.pth`` if it is readable, else write it from the loaded state, and say so.

        Returns:
            the final model's path.
        """
        path = os.path.join(self.save_dir, f"{name}.pth")
        try:
            read_checkpoint(path)
            done = "kept"
        except CheckpointError as e:
            if os.path.exists(path):
                logger.warning(f"Rewriting the unreadable final model: {e}")
            self.save(name, iteration=iteration)
            done = "written from it"
        logger.warning(f"SOLVER.MAX_ITER {max_iter} is already reached: the checkpoint is at "
                       f"iteration {iteration}, so there is nothing to train. Final model "
                       f"{path}: {done}. Raise SOLVER.MAX_ITER to train longer")
        return path


def _split_load_options(path: str) -> Tuple[str, bool]:
    """(path without its ``?...`` options, whether they ask for matching heuristics).

    Raises:
        CheckpointError: an option other than ``matching_heuristics=True|False``.
    """
    if not path or "?" not in path:
        return path, False
    parsed = urlparse(path)
    options = parse_qs(parsed.query, keep_blank_values=True)
    heuristics = options.pop("matching_heuristics", ["False"])
    if options or heuristics not in (["True"], ["False"]):
        raise CheckpointError(
            f"MODEL.WEIGHTS {path}: unsupported option(s) after '?' ({parsed.query}); the only "
            "one is matching_heuristics=True (load by detectron2's name matching, e.g. "
            "backbone weights saved without the model's prefixes)")
    return parsed._replace(query="").geturl(), heuristics == ["True"]


def _same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


# ----------------------------------------------------------------------------- inference
def _group(key: str) -> str:
    """The part of a state-dict name that says where in the model it is: the module path up
    to a block index, e.g. ``backbone.res4``, ``transformer.decoder.layers.3``,
    ``class_embed``."""
    parts = key.split(".")[:-1] or [key]
    out: List[str] = []
    for i, p in enumerate(parts):
        if p.isdigit():
            if out and out[-1] == "layers":
                out.append(p)
            break
        out.append(p)
        if len(out) == 2 and not (i + 1 < len(parts) and parts[i + 1] == "layers"):
            break
    return ".".join(out)


def describe_groups(keys: Iterable[str], limit: int = 8) -> str:
    """``keys`` summarised by model part, e.g. ``transformer.decoder.layers.{3,4,5} (48),
    class_embed (12)``."""
    counts: Dict[str, int] = defaultdict(int)
    for k in keys:
        counts[_group(k)] += 1
    # Layers of one stack that are all affected are listed together.
    merged: Dict[str, Tuple[List[str], int]] = {}
    for g, n in counts.items():
        m = re.fullmatch(r"(.*\.layers)\.(\d+)", g)
        base, idx = (m.group(1), m.group(2)) if m else (g, "")
        ids, total = merged.get(base, ([], 0))
        merged[base] = (ids + ([idx] if idx else []), total + n)
    items = []
    for base, (ids, n) in sorted(merged.items()):
        ids = sorted(ids, key=int)
        name = base + ("" if not ids else f".{ids[0]}" if len(ids) == 1 else
                       ".{" + ",".join(ids) + "}")
        items.append(f"{name} ({n})")
    more = f", and {len(items) - limit} more part(s)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _refuse(message: str, allow_random_weights: bool) -> None:
    if not allow_random_weights:
        raise CheckpointError(f"{message}. To run anyway with random values there, pass "
                              f"{_OVERRIDE}")
    logger.warning(f"{message}. Running anyway ({_OVERRIDE})")


def load_inference_weights(model: torch.nn.Module, weights: str, *, save_dir: str = "",
                           resume: bool = False, allow_random_weights: bool = False,
                           allowed_missing: Sequence[str] = ALLOWED_MISSING,
                           class_names: ClassNames = None,
                           class_head_init: str = "by_name") -> str:
    """Load the weights a model is evaluated or run with, and check they are complete.

    Args:
        weights: ``MODEL.WEIGHTS``, a path or URL.
        save_dir, resume: with ``resume`` and a checkpoint in ``save_dir`` (``OUTPUT_DIR``),
            load the newest readable one instead, as ``--eval-only --resume`` does.
        allow_random_weights: warn instead of failing when there are no weights or they
            leave model entries unloaded.
        allowed_missing: regular expressions of state-dict names that may stay unloaded.
        class_names, class_head_init: the model's classes and what to do with class heads of
            other classes (see :class:`SafeDetectionCheckpointer`; :func:`class_head_options`
            makes both from a config). Classes of the model that the file has no row for
            (the prior rows) count as unloaded: their scores would be untrained.

    Returns:
        the file loaded ("" when there was none and ``allow_random_weights``).

    Raises:
        CheckpointError: unreadable or unsafe file; no weights, or entries of the model
            left unloaded (both unless ``allow_random_weights``); non-finite values.
    """
    checkpointer = SafeDetectionCheckpointer(model, save_dir=save_dir, class_names=class_names,
                                             class_head_init=class_head_init)
    path = weights
    if resume and save_dir and checkpointer.has_checkpoint():
        path = checkpointer.get_checkpoint_file() or weights
    if not path:
        _refuse("No weights to run the model with: MODEL.WEIGHTS is empty, so every "
                "parameter would keep its random initial value. Set MODEL.WEIGHTS to a "
                "checkpoint of this config (e.g. OUTPUT_DIR/model_final.pth, or released "
                "weights converted with tools/convert_weights.py)", allow_random_weights)
        return ""
    checkpointer.load(path, checkpointables=[])

    allowed = [re.compile(p) for p in allowed_missing]
    unloaded = [k for k in checkpointer.unloaded if not any(p.search(k) for p in allowed)]
    if unloaded:
        total = len([k for k in model.state_dict() if not any(p.search(k) for p in allowed)])
        what = ("none of its tensors has the name of one of this model: it is a checkpoint "
                "of another model" if checkpointer.matched == 0 else
                f"it leaves {len(unloaded)} of the model's {total} tensors unloaded")
        shapes = ""
        if checkpointer.incorrect_shapes:
            k, got, want = checkpointer.incorrect_shapes[0]
            shapes = (f" ({len(checkpointer.incorrect_shapes)} of other shape, e.g. {k}: "
                      f"{got} in the file, {want} in the model; check the config's sizes, "
                      "e.g. MODEL.DEFORMABLE_DETR.NUM_CLASSES)")
        _refuse(f"MODEL.WEIGHTS {path} does not fit this model: {what}{shapes}. Unloaded: "
                f"{describe_groups(unloaded)}. Use a checkpoint trained with this config, or "
                "convert released weights with tools/convert_weights.py and use the config it "
                "prints", allow_random_weights)
    heads = checkpointer.class_heads
    if heads is not None and heads.initialised:
        shown = ", ".join(heads.initialised[:8]) + (", ..." if len(heads.initialised) > 8 else "")
        _refuse(f"MODEL.WEIGHTS {path} has no class-head rows for {len(heads.initialised)} of "
                f"this model's {len(heads.model_classes)} classes ({shown}; CLASS_HEAD_INIT "
                f"{heads.mode}): their scores would be untrained. Fine-tune "
                "on this dataset first (train_net.py with these weights as MODEL.WEIGHTS) and "
                "use the model it writes", allow_random_weights)

    bad = [k for k, v in model.state_dict().items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        where = ", ".join(bad) if len(bad) <= 3 else describe_groups(bad)
        raise CheckpointError(
            f"MODEL.WEIGHTS {path} holds NaN or infinite values in {len(bad)} tensor(s): "
            f"{where}. The training that wrote it diverged; use an earlier checkpoint (a "
            "lower learning rate or gradient clipping avoids this)")
    return path
