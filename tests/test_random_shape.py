"""benchmarks/random_shape.py: a named shape's random checkpoint loads with its tokenizer, and its size is
the one core/defaults.py reads from the config (what the CUDA-graph rule compares with GRAPHS_BELOW)."""

import sys

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from core import defaults
from core.model import EMBEDDED_TOKENIZER

sys.path.insert(0, str(ROOT / "benchmarks"))
import random_shape  # noqa: E402


def test_a_shape_saves_loads_and_counts_as_the_defaults_do(tmp_path):
    n = random_shape.build("smollm2-360m", EMBEDDED_TOKENIZER, tmp_path, layers=2)
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.num_hidden_layers, config.tie_word_embeddings) == (960, 2, True)
    weights = sum(defaults._weights(config))
    assert n == weights + 960 * (2 * 2 + 1)  # and the norms: two a layer and the final one
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == n
    ids = AutoTokenizer.from_pretrained(tmp_path)("hello world")["input_ids"]
    assert ids and max(ids) < config.vocab_size

