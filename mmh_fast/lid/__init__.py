from .knn_estimators import mle_lid, twonn_lid
from .lpca import LocalPCA, lpca
