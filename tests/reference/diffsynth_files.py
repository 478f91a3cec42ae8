"""Loads single files of the pinned DiffSynth wheel (diffsynth==2.1.12) for the reference
scripts, without running the package __init__ files (they import torchvision and most of
the package). The wheel is unpacked once; the packages on the way to a file are
registered as empty modules whose __path__ points into the unpacked wheel, so the file's
own relative imports still resolve.

    pip download diffsynth==2.1.12 --no-deps -d /tmp/dsynth
"""

import importlib
import os
import sys
import types
import zipfile

WHEEL = "/tmp/dsynth/diffsynth-2.1.12-py3-none-any.whl"
UNPACKED = os.path.join("/tmp", "diffsynth-2.1.12-unpacked")


def _register(wheel, packages):
    if not os.path.isdir(os.path.join(UNPACKED, "diffsynth")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(UNPACKED)
    for pkg in packages:
        if pkg not in sys.modules:
            m = types.ModuleType(pkg)
            m.__path__ = [os.path.join(UNPACKED, *pkg.split("."))]
            sys.modules[pkg] = m


def load_dit(wheel=WHEEL):
    """`diffsynth.models.wan_video_dit` and the Wan DiT state-dict converter
    (`diffsynth.utils.state_dict_converters.wan_video_dit`)."""
    _register(wheel, ["diffsynth", "diffsynth.models", "diffsynth.core", "diffsynth.utils",
                      "diffsynth.utils.state_dict_converters"])
    dit = importlib.import_module("diffsynth.models.wan_video_dit")
    conv = importlib.import_module("diffsynth.utils.state_dict_converters.wan_video_dit")
    return dit, conv


def load_flow_match(wheel=WHEEL):
    """`diffsynth.diffusion.flow_match` (FlowMatchScheduler)."""
    _register(wheel, ["diffsynth", "diffsynth.diffusion"])
    return importlib.import_module("diffsynth.diffusion.flow_match")


def load_loss(wheel=WHEEL):
    """`diffsynth.diffusion.loss` (FlowMatchSFTLoss). Its only import besides torch is
    `BasePipeline`, used as a type annotation; the real one imports the whole package,
    so an empty class stands in for it."""
    _register(wheel, ["diffsynth", "diffsynth.diffusion"])
    if "diffsynth.diffusion.base_pipeline" not in sys.modules:
        base = types.ModuleType("diffsynth.diffusion.base_pipeline")
        base.BasePipeline = type("BasePipeline", (), {})
        sys.modules["diffsynth.diffusion.base_pipeline"] = base
    return importlib.import_module("diffsynth.diffusion.loss")
