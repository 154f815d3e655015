"""Text-conditioned memorization in Stable Diffusion pipelines (MMH paper
Sec. 3, 4.1, 4.2, App. C, D): detection, differentiable metrics, token
attributions and mitigation. Everything takes any diffusers
StableDiffusionPipeline-like object (tokenizer, text_encoder, unet, a scheduler
with alphas_cumprod, optionally a VAE), SD 1.x or 2.x, fp16 or fp32, CPU or
CUDA, with the weights the user has locally.

Detection
- :func:`cfg_norm`: Wen et al.'s CFG-vector norm along the DDIM sampling
  trajectory (steps (0, 1): the one-step detector).
- :func:`cfg_norm_train`: the CFG-vector norm of training images with their
  captions after a few conditional probability-flow Euler steps (App. C).
- Conditional and unconditional LID of training images (Sec. 4.1, Fig. 6) come
  from :func:`mmh_fast.flipd` on the same pipeline, in the VAE latent space:

      mmh_fast.flipd(pipe, images, t0, cond=captions)   # LID_theta(x | c)
      mmh_fast.flipd(pipe, images, t0, cond="")         # LID_theta(x)
      mmh_fast.flipd(pipe, images, t0)                  # the same: "" is the default

  (images [B, 3, H, W] in [-1, 1]; the paper uses t0 = 0.05 and one Hutchinson
  probe; low values flag memorization, and LID_theta(x | c) <= LID_theta(x) is
  Prop. 3.2's conditioning effect.)

Differentiable metrics and attributions
- :func:`memorization_score`: A^CFG, A^{s CFG}, A^FLIPD (Eq. 24, 25, 28).
- :func:`token_attributions`: gradient norms of a metric w.r.t. the
  text-encoder output hidden states (or, ``wrt="token_embeddings"``, its
  input token embeddings, through the encoder), per token, normalised.

Mitigation
- :func:`mitigate`: attribution-weighted token sampling + a rephraser
  ("drop", the Somepalli et al. baselines, or any callable such as
  :class:`OpenAIChatRephraser`, the paper's Box 1 instruction).
- :func:`optimize_prompt_embedding`: Wen et al.'s embedding optimisation
  (minimise A^CFG) and App. D.3's maximisation of A^FLIPD.
- :func:`evaluate_mitigation`: similarity to reference images and CLIP score
  of the images generated from the new prompts, with offline loaders
  :func:`load_sscd_similarity` and :func:`load_clip_score`.
- :func:`generate`: the CFG DDIM images every function here samples from.
"""
from .attribution import prompt_tokens, token_attributions
from .detection import cfg_norm, cfg_norm_train
from .attribution import PromptTokens
from .metrics import DEFAULT_T_RANGES, METRICS, memorization_score
from .mitigation import (BOX1_INSTRUCTION, REPHRASERS, OpenAIChatRephraser, evaluate_mitigation, generate,
                         load_clip_score, load_sscd_similarity, mitigate, optimize_prompt_embedding)

__all__ = ["cfg_norm", "cfg_norm_train", "memorization_score", "token_attributions", "prompt_tokens", "PromptTokens",
           "mitigate", "OpenAIChatRephraser", "optimize_prompt_embedding", "generate", "evaluate_mitigation",
           "load_sscd_similarity", "load_clip_score", "METRICS", "DEFAULT_T_RANGES", "REPHRASERS",
           "BOX1_INSTRUCTION"]

# the score-geometry detectors of 2024-2026 (issue 16)
from .sharpness import (HESSIAN_BRANCHES, SAILResult, generate_sail, hessian_eigenvalues,  # noqa: E402
                        hessian_score_difference_norm, optimize_initial_noise)

__all__ += ["hessian_score_difference_norm", "hessian_eigenvalues", "optimize_initial_noise", "generate_sail",
            "SAILResult", "HESSIAN_BRANCHES"]
from .anisotropy import NormAlignment, adapt_prompt_embedding, norm_alignment_score  # noqa: E402

__all__ += ["norm_alignment_score", "NormAlignment", "adapt_prompt_embedding"]
from .maps import curvature_difference_map, map_localization, map_overlay, score_difference_map  # noqa: E402

__all__ += ["curvature_difference_map", "score_difference_map", "map_localization", "map_overlay"]
from .attention import (cross_attention_entropy, cross_attention_layers,  # noqa: E402
                        cross_attention_probabilities, generate_attention_rescaled)

__all__ += ["cross_attention_entropy", "cross_attention_probabilities", "cross_attention_layers",
            "generate_attention_rescaled"]
