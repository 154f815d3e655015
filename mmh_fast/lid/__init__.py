"""LID estimators: FLIPD and the normal bundle for diffusion models."""
from .flipd import flipd, flipd_curve  # noqa: F401
from .normal_bundle import normal_bundle  # noqa: F401
