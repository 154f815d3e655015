"""The memorization lab: a real diffusers text-to-image model trained here on
CPU (scikit-learn's digits, upscaled) with planted DD-Mem and OD-Mem, its
ground truth checked by generation, and every detector of the library
measured on it through the public API.

- :func:`build`: train (or reuse) the lab in a directory.
- :func:`ground_truth`: generate n images per prompt with the pipeline's own
  ``__call__`` and flag copies by calibrated l2 < 1/3; :func:`verify` does it
  for every prompt of a built lab, with the planted/verified counts.
- :func:`run_lab`: everything ``mmh-fast lab`` does (ground truth, detection
  table, image-level signals, attribution, mitigation, report).
- :func:`save_checkpoint` / :func:`load_checkpoint`: a compact float16 copy
  (the tests' committed quick lab).
"""
from .build import Lab, build, load_checkpoint, save_checkpoint
from .training import LabConfig
from .truth import COPY_THRESHOLD, copy_scores, generate_images, ground_truth
from .run import run_lab, verify

__all__ = ["build", "Lab", "save_checkpoint", "load_checkpoint", "LabConfig", "ground_truth", "verify", "run_lab",
           "generate_images", "copy_scores", "COPY_THRESHOLD"]
