"""LID estimators: FLIPD and the normal bundle for diffusion models, Jacobian rank for
decoders, the MMH memorization classes and PNG complexity."""
from .flipd import flipd, flipd_curve  # noqa: F401
from .normal_bundle import normal_bundle  # noqa: F401
from .complexity import png_bytes, png_complexity, png_normalized_lid  # noqa: F401
from .jacobian import jacobian_rank  # noqa: F401
from .memorization import MemorizationClasses, classify_memorization  # noqa: F401
