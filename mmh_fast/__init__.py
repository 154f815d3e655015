"""mmh_fast: find, explain and prevent memorization in generative models
through local intrinsic dimension (the manifold memorization hypothesis)."""
__version__ = "0.1.0"

from ._native import backend_info  # noqa: E402
from . import ops  # noqa: E402
from .lid.flipd import flipd, flipd_curve  # noqa: E402
from .lid.normal_bundle import normal_bundle  # noqa: E402
from .lid import (MemorizationClasses, classify_memorization, jacobian_rank, png_complexity,  # noqa: E402
                  png_normalized_lid)
from . import mitigations, retrieval, solidmark  # noqa: E402

__all__ = ["__version__", "backend_info", "ops", "flipd", "flipd_curve", "normal_bundle", "retrieval", "solidmark",
           "mitigations", "jacobian_rank", "classify_memorization", "MemorizationClasses", "png_complexity",
           "png_normalized_lid"]
