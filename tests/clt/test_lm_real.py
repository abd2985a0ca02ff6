"""The embedded real models against transformers loading the same GGUF file (float32)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clt.lm import forward, load_model
from clt.lm.loading import embedded_path

TOL = 1e-3  # max abs logit difference; both sides dequantize the same GGUF to float32
PROMPTS = [
    "The capital of France is",
    "The opposite of small is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Roses are red, violets are blue, sugar is sweet, and so are",
]


def _reference(path):
    import torch
    import transformers as tf

    torch.set_num_threads(2)
    model = tf.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _compare(name: str, ours, ref, with_bos: bool):
    import torch

    tok = ours.tokenizer
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok.encode(prompt, add_bos=with_bos)
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits.float().numpy()
        got, _ = forward(ours.params, ours.cfg, jnp.asarray([ids]))
        worst = max(worst, float(np.abs(np.asarray(got) - want).max()))
    assert worst <= TOL, f"{name}: max abs logit diff {worst:.2e} over {len(PROMPTS)} prompts"
    return worst


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_smollm2_matches_transformers(smollm2):
    ref = _reference(embedded_path("smollm2-135m"))
    _compare("smollm2-135m", smollm2, ref, with_bos=False)
    _compare("smollm2-135m", smollm2, ref, with_bos=True)


def test_smollm2_paris(smollm2):
    ids = smollm2.tokenizer.encode("The capital of France is")
    logits, _ = forward(smollm2.params, smollm2.cfg, jnp.asarray([ids]))
    probs = np.asarray(jax.nn.softmax(logits[0, -1]))
    top = int(probs.argmax())
    assert smollm2.tokenizer.decode([top]) == " Paris"
    # Reference figure measured with transformers on the same GGUF: 0.773.
    assert abs(probs[top] - 0.773) < 0.005


def test_smollm2_tokenizer_matches_transformers(smollm2):
    import transformers as tf

    path = embedded_path("smollm2-135m")
    ref = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for prompt in PROMPTS + ["  leading spaces, ünïcödé and 中文"]:
        assert smollm2.tokenizer.encode(prompt, add_bos=False) == \
            ref(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_gemma3_matches_transformers():
    ours = load_model("gemma3-270m")
    ref = _reference(embedded_path("gemma3-270m"))
    _compare("gemma3-270m", ours, ref, with_bos=True)


def test_tokenizer_needs_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "from clt.lm.loading import embedded_path\n"
        "from clt.lm.gguf_io import _reader\n"
        "from clt.lm.tokenizer import tokenizer_from_gguf\n"
        "tok = tokenizer_from_gguf(_reader(embedded_path('smollm2-135m')), 1, (2,))\n"
        "print(tok.encode('The capital of France is'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[504, 3575, 282, 4649, 314]"


def test_a_transformers_without_the_gguf_converter_is_refused_with_the_fix(monkeypatch):
    """transformers 5.17 (a GPU image's) has no convert_gguf_tokenizer: one line naming the fix,
    not an ImportError from inside the loader."""
    import sys

    from clt.configs import ConfigError
    from clt.lm.gguf_io import _reader
    from clt.lm.tokenizer import tokenizer_from_gguf

    # importing it now fails
    monkeypatch.setitem(sys.modules, "transformers.integrations.gguf.gguf_tokenizer_mapping", None)
    with pytest.raises(ConfigError, match=r"no GGUF tokenizer converter .* "
                                          r"pip install -U 'transformers>=5.25'"):
        tokenizer_from_gguf(_reader(embedded_path("smollm2-135m")), 1, (2,))


def test_tokenizer_from_hf_directory(smollm2, tmp_path):
    """A Hugging Face directory's tokenizer.json + tokenizer_config.json give the same tokenizer."""
    from clt.lm.tokenizer import tokenizer_from_dir

    tok = smollm2.tokenizer
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "add_bos_token": True, "chat_template": tok.chat_template}))
    loaded = tokenizer_from_dir(tmp_path, bos=None, eos=(2,))
    assert loaded.bos_token_id == tok.token_to_id("<|im_start|>") and loaded.add_bos
    for prompt in PROMPTS:
        assert loaded.encode(prompt) == [loaded.bos_token_id] + tok.encode(prompt, add_bos=False)
    msgs = [{"role": "user", "content": "Hi"}]
    assert loaded.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
