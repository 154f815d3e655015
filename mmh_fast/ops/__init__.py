"""Native kernels, one entry per kernel family; the backend (CPU or CUDA) is
chosen by the device of the input. Plain-PyTorch statements of each kernel are
in :mod:`mmh_fast.ops.reference`."""
from .hutchinson import hutchinson_probes, hutchinson_trace
from .knn import knn
from .local_pca import local_pca, local_pca_count
from .svd_rank import svd_rank

__all__ = ["hutchinson_probes", "hutchinson_trace", "knn", "local_pca", "local_pca_count", "svd_rank"]
