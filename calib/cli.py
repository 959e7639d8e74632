"""The calibration stage's subcommands: ``gammamod calib arank|capacity|quantize``.

Each part has its own ``_register_<part>(sub)`` and handler here; the work lives in the part's
module (``calib/arank.py``, ``calib/capacity.py``, ``calib/quantize.py``), imported when the
command runs."""

from __future__ import annotations


def register(sub) -> None:
    """Add ``gammamod calib ...`` to the command line."""
    p = sub.add_parser("calib", help="calibrate: ARank layer analysis, capacities from data, quantization",
                       description="Calibration before building engines: which layers can be MoD layers (arank), "
                                   "the static capacity each MoD layer needs (capacity), INT8/INT4/FP8 artifacts "
                                   "(quantize).")
    calib_sub = p.add_subparsers(dest="calib_command", metavar="CALIB_COMMAND", required=True)
    for part in PARTS:
        part(calib_sub)


PARTS: list = []  # each part's _register_<part>, in the order the help lists them
