"""``python -m export --checkpoint runs/D/best.pt [--tta five] [--precision fp32] [--test-scale Q] [--out PATH]``

``--checkpoint`` also takes a VGG state dict in torchvision's layout (``.pth``/``.pt`` or
``.safetensors``, e.g. ``vgg16-397923af.pth``); ``--labels FILE`` names its classes when
they are not ImageNet-1k's 1,000.

Exit codes: 0 exported (and registered), 2 bad input or a failed check (one-line error).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from export.core import (
    INT8_AGREEMENT_IMAGES,
    INT8_CALIBRATION_IMAGES,
    INT8_MIN_AGREEMENT,
    PRECISIONS,
    ExportError,
    export_checkpoint,
)
from export.graph import TTA_MODES
from export.onnx_io import show_exporter_logs
from vgg.errors import OneLineArgumentParser


def count_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog="python -m export",
        description="Export a VGG training checkpoint to ONNX (preprocessing and test-time crops inside the "
        "graph), check it against PyTorch, and register it in the BentoML store as vgg:<version>.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="training checkpoint (runs/D-.../best.pt) or a torchvision-layout VGG state dict (.pth/.pt/.safetensors)",
    )
    parser.add_argument(
        "--labels",
        default=None,
        metavar="FILE",
        help="class names, one per line in index order (default: the checkpoint's; ImageNet-1k's "
        "for a 1,000-class state dict)",
    )
    parser.add_argument("--tta", choices=TTA_MODES, default="five", help="test-time views (default: five)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (always built), plus fp16 (GPU) or int8 (CPU, QDQ) (default: fp32)",
    )
    parser.add_argument(
        "--test-scale",
        type=int,
        default=None,
        metavar="Q",
        help="test scale Q: side of the square input image (default: the checkpoint's)",
    )
    # The flag's earlier name, still accepted.
    parser.add_argument("--scale", dest="test_scale", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--test-scales",
        type=count_at_least(1),
        nargs="+",
        default=None,
        metavar="Q",
        help="several test scales (paper, section 4.2), e.g. --tta dense --test-scales 256 384 512: "
        "the graph takes the largest Q and resizes inside; posteriors averaged over the scales",
    )
    parser.add_argument("--out", default=None, help="also write the requested precision's .onnx here")
    parser.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="do not register in the BentoML store (needs --out)",
    )
    parser.add_argument(
        "--check-images",
        nargs="+",
        default=None,
        metavar="IMAGE",
        help="real images for the checks (default: a few from the training folder)",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        metavar="DIR",
        help="int8 calibration images (default: the checkpoint's training folder)",
    )
    parser.add_argument(
        "--calibration-images",
        type=count_at_least(1),
        default=INT8_CALIBRATION_IMAGES,
        help=f"int8 calibration image count (default: {INT8_CALIBRATION_IMAGES})",
    )
    parser.add_argument(
        "--agreement-images",
        type=count_at_least(INT8_AGREEMENT_IMAGES),
        default=INT8_AGREEMENT_IMAGES,
        help=f"int8 vs fp32 agreement image count, at least {INT8_AGREEMENT_IMAGES} (default: {INT8_AGREEMENT_IMAGES})",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=INT8_MIN_AGREEMENT,
        help=f"int8 minimum top-1 agreement with fp32 (default: {INT8_MIN_AGREEMENT})",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress, and the ONNX exporter's own messages"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("export").setLevel(logging.INFO)
        show_exporter_logs()
    try:
        result = export_checkpoint(
            args.checkpoint,
            tta=args.tta,
            precision=args.precision,
            test_scale=args.test_scale,
            test_scales=args.test_scales,
            out=args.out,
            register=args.register,
            check_images=args.check_images,
            calibration=args.calibration,
            calibration_count=args.calibration_images,
            agreement_count=args.agreement_images,
            min_agreement=args.min_agreement,
            labels=args.labels,
        )
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "int8_top1_agreement" in result.checks:
        print(
            f"int8 top-1 agreement with fp32: {result.checks['int8_top1_agreement']:.2%} on "
            f"{result.checks['int8_agreement_images']} images not used for calibration"
        )
    if "fp16_max_abs_diff" in result.checks:
        print(
            f"fp16 vs fp32: top-1 agreement {result.checks['fp16_top1_agreement']:.2%}, "
            f"max abs diff {result.checks['fp16_max_abs_diff']:.3g}"
        )
    checks = ", ".join(
        f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in result.checks.items()
    )
    print(f"checks: {checks}")
    if result.tag:
        print(f"registered {result.tag}")
    print(f"onnx: {result.onnx_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
