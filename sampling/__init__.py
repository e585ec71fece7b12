"""Generation engines behind one small protocol, and nothing about training.

``Engine.generate(prompts, params)`` returns K candidates per prompt; ``load_weights`` swaps in
new policy weights (for online loops). Prompts are chat message lists rendered with the
policy's own chat template.
"""

from sampling.base import Candidate, Engine, SamplingParams, render_prompts

__all__ = ["Candidate", "Engine", "SamplingParams", "render_prompts"]
