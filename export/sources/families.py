"""The supported model families, as the switches of the one reference model each one sets
(export/model/config.py). Both source kinds map onto this one table: Hugging Face folders by
`model_type` (hf.py), GGUF files by `general.architecture` (gguf.py). What a family's config sets
per model (windows, soft-caps, rope) each loader reads from its own spelling of it."""

from __future__ import annotations

GEMMA = {"norm_offset": 1.0, "activation": "gelu_tanh", "sandwich_norm": True}

SWITCHES = {
    "llama": {},  # Llama 2 / 3.x, TinyLlama, SmolLM2
    "mistral": {},  # + a sliding window where the config sets one
    "qwen2": {"qkv_bias": True},  # Qwen2 / 2.5: biases on q, k, v
    "qwen3": {"qk_norm": True},  # RMSNorm on each head of q and k
    "gemma2": GEMMA,  # + soft-capping, alternating sliding / full layers
    "gemma3": {**GEMMA, "qk_norm": True},  # + 5 sliding per full layer with their own theta
    "phi3": {},  # fused q/k/v and gate/up weights, longrope
}

# the end-of-turn markers of the families' chat templates: where a GGUF does not list them as
# end-of-sequence tokens, chat must still stop on them (llama.cpp's end-of-generation list)
END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")

# the chat template of a family whose GGUF carries none (a base model's file), as llama.cpp's
# built-in templates (src/llama-chat.cpp) format it; "<bos>" is written out because the runtime
# encodes a rendered chat without adding special tokens
GEMMA_CHAT = (
    "<bos>{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
BUILTIN_CHAT_TEMPLATES = {"gemma2": GEMMA_CHAT, "gemma3": GEMMA_CHAT}
