from .complexity import png_bytes, png_complexity, png_normalized_lid
from .jacobian import jacobian_rank
from .memorization import MemorizationClasses, classify_memorization
