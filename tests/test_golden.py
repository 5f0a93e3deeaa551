"""The real default model answers a chat prompt coherently (greedy golden tokens)."""

from export.model.generate import generate

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
GOLDEN = "The capital of France is Paris."


def test_reference_greedy_golden_answer(default_model, default_tokenizer):
    ids = default_tokenizer.encode_chat(PROMPT)
    out = generate(default_model, [ids], 24, stop_ids=default_model.config.eos_token_ids)[0]
    assert out[-1] == 2  # <|im_end|>
    assert default_tokenizer.decode(out) == GOLDEN
