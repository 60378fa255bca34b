#!/usr/bin/env python
"""Convert released Deformable DETR weights to a detectron2 checkpoint.

    python tools/convert_weights.py INPUT OUTPUT [--format auto|official|huggingface]

INPUT is an official checkpoint (``r50_deformable_detr*-checkpoint.pth``, any of the five
released variants) or a Hugging Face ``DeformableDetrForObjectDetection`` checkpoint (its
directory with config.json and weights, or a ``.bin`` / ``.safetensors`` file). OUTPUT is a
``.pth`` file for ``MODEL.WEIGHTS``. The tool prints the detected variant and the config to
evaluate it with. Loading never runs code stored in the input file.
"""
import argparse
import os
import sys

from deformable_detr.checkpoint import (
    FORMATS,
    VARIANTS,
    CheckpointError,
    convert_checkpoint,
    save_detectron2_checkpoint,
)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("input", help="official .pth, or Hugging Face directory / weights file")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pth)")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="format of INPUT (default: detected)")
    parser.add_argument("--classes", default="auto", choices=("auto", "coco", "identity"),
                        help="class heads: 'coco' maps 91 COCO-id rows to detectron2's 80 "
                             "contiguous classes,\n'identity' keeps the rows; 'auto' (default) "
                             "is 'coco' for 91-row heads")
    parser.add_argument("--variant", default=None, choices=sorted(VARIANTS),
                        help="force the variant (only needed for the single-scale DC5 model "
                             "when\nthe file records no dilation)")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if os.path.isdir(args.output):
        # Checked before the (slow) conversion, not when writing.
        print(f"error: OUTPUT {args.output} is a folder; name the file to write, e.g. "
              f"{os.path.join(args.output, 'model.pth')}", file=sys.stderr)
        return 1
    try:
        result = convert_checkpoint(args.input, format=args.format, class_mapping=args.classes,
                                    variant=args.variant)
        save_detectron2_checkpoint(result, args.output)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {args.output} ({e.strerror or e}); choose another path",
              file=sys.stderr)
        return 1
    print(f"wrote {len(result.state_dict)} tensors to {args.output}")
    print(result.summary(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
