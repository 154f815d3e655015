"""LID estimators: FLIPD and the normal bundle for diffusion models."""
from .flipd import flipd, flipd_curve  # noqa: F401
from .knn_estimators import mle_lid, twonn_lid  # noqa: F401
from .lpca import LocalPCA, lpca  # noqa: F401
