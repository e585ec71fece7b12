"""TRL's fused LM head, set up for CPU: score only the tokens with a label, in tiles that fit the cache.

TRL (1.16) computes per-token log-probs without materializing the ``(batch, length, vocab)``
logits: ``trl.trainer.utils.add_fused_lm_head`` runs the backbone, then
``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` projects the hidden states through the LM
head tile by tile and folds each tile into an online log-sum-exp (the backward recomputes the
tiles). SFTTrainer, DPOTrainer (its policy, reference and precomputed-reference passes) and
GRPOTrainer all go through it. Two of its choices are made for GPUs and cost a CPU dearly:

1. **Which positions are scored.** With Triton (CUDA, XPU) only positions whose label is not
   -100 are projected; everywhere else every position is, prompt and padding included, because
   on Neuron a varying number of positions would recompile the tiles. Eager CPU has nothing to
   recompile, so we score only the labelled positions there too (the rest are zeros either way:
   TRL fills them with ``masked_scatter`` into zeros or ``masked_fill``).
2. **Tile size.** 4096 tokens x 32768 vocabulary entries: one cuBLAS call on a GPU, but 512 MB
   of fp32 that the CPU fallback then sweeps with a dozen torch element-wise ops, each streaming
   it from memory. 512 x 4096 tiles (8 MB) stay in cache.

Measured on SmolLM2-135M-Instruct (49,152-token vocabulary, frozen tied head as with LoRA), 2
torch threads, 2-core AMD EPYC: forward + backward of the head over 8 x 256 tokens of which 1,080
are labelled took 8.2 s as shipped, 4.0 s scoring only the labelled ones and 2.4 s with the
small tiles (the three matmuls alone need ~1.5 s at this machine's matmul peak); log-probs and
gradients agree to 2e-6. That head was ~40% of a LoRA DPO step.

Departure from TRL: none in what is computed; the sums run in a different order, so results
differ from TRL's in the last float bits. Only on machines without CUDA or XPU are the tile sizes
changed (they are module-wide, and a GPU keeps TRL's); the labelled-only scoring applies to CPU
tensors wherever they are. Applied by the trainer stages (``align.training.trainer.train_to_end``, and
``align dpo`` before building its trainer, whose reference pass runs at construction).
"""

from __future__ import annotations

import torch

TOKENS_PER_TILE, VOCAB_PER_TILE = 512, 4096  # CPU tiles: 8 MB of fp32


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def tune_fused_lm_head_for_cpu() -> bool:
    """Make TRL's fused LM head score only labelled positions on CPU and, on a machine without
    CUDA/XPU, use cache-sized tiles. Idempotent; True when TRL's fused head was found and set up.

    Touches three private names of trl 1.16 (pinned in pyproject.toml; tests/align/training/test_fused_head.py
    fails if a TRL upgrade moves them): ``trl.trainer.utils._use_triton`` (as that module sees it:
    it only decides the compaction there; the kernels module keeps its own reference, which picks
    Triton kernels or torch tiles), ``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`` and
    ``trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE``."""
    try:
        import trl.kernels.chunked_logprob as kernels
        import trl.trainer.utils as trl_utils
    except ImportError:
        return False
    names = (
        hasattr(trl_utils, "_use_triton"),
        hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"),
        hasattr(kernels, "TOKEN_CHUNK_SIZE"),
    )
    if not all(names):
        return False
    triton_only = trl_utils._use_triton
    if not getattr(triton_only, "align_compacts_cpu", False):

        def scores_labelled_only(device: torch.device) -> bool:
            return device.type == "cpu" or triton_only(device)

        scores_labelled_only.align_compacts_cpu = True
        trl_utils._use_triton = scores_labelled_only
    if not _has_accelerator():
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = VOCAB_PER_TILE
        kernels.TOKEN_CHUNK_SIZE = TOKENS_PER_TILE
    return True
