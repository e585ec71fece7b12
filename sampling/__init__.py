"""Generation engines behind one small protocol, and selection strategies; nothing about training.

``Engine.generate(prompts, params)`` returns K candidates per prompt; ``load_weights`` swaps in
new policy weights (for online loops). Prompts are chat message lists rendered with the
policy's own chat template. ``build_engine("auto" | "vllm" | "transformers", path)`` makes one;
``sampling.select`` turns scored candidates into training rows.
"""

from sampling.base import ENGINES, Candidate, Engine, SamplingParams, encode_prompts, render_prompts
from sampling.engines import EngineOptions, build_engine, default_engine
from sampling.select import STRATEGIES, Scored, SelectOptions, dedupe, get_strategy

__all__ = [
    "ENGINES",
    "STRATEGIES",
    "Candidate",
    "Engine",
    "EngineOptions",
    "SamplingParams",
    "Scored",
    "SelectOptions",
    "build_engine",
    "dedupe",
    "default_engine",
    "encode_prompts",
    "get_strategy",
    "render_prompts",
]
