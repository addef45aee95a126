"""RMS-Net student, teacher wrapper, losses and reports for RMS-Distill.

Importing the package imports `rmsnet.model`, which registers the RMS-Net variants (rmsnet_xxs,
rmsnet_xs) with timm's model registry, so `timm.create_model("rmsnet_xxs")` works afterwards.
"""
from . import model  # noqa: F401  (registration side effect)
