# The runs on the GPU, in order (each command a separate job; OUT is its output folder).
# /tmp/smol: SmolLM2-135M-Instruct built from its GGUF (tests/real_checkpoint.build);
# /tmp/chats.jsonl: benchmarks/defaults.chat_data(path, 3000, /tmp/smol, lengths="instruction").
# /tmp/old: the same tree with core/evaluate.py and train.py as of 69ca0d4 (greedy decoding).
M="--model /tmp/smol --lora --dataset /tmp/chats.jsonl --max-steps 5 --skip-export"
# command A (tree 6bf3b6d, decoding): killed at the command's 600 s limit during its second run
python3 run_one.py eval-default -- $M
python3 run_one.py eval-default-nocudnn --no-cudnn -- $M
# command B (tree 6bf3b6d): the validation loss alone
python3 run_one.py eval-loss-only -- $M --eval-exact-match 0
python3 run_one.py eval-loss-only-nocudnn --no-cudnn -- $M --eval-exact-match 0
python3 run_one.py eval-loss-only-nocompile -- $M --eval-exact-match 0 --no-compile
# command C (tree 9ffd332, one forward): killed at its 580 s limit during the old tree's run
python3 run_one.py eval-new -- $M
python3 run_one.py eval-new-every -- $M --eval-every 1
(cd /tmp/old && python3 run_one.py eval-old -- $M)
# command D: both trees in one command, 32 exact-match samples; the old run cut at 115 s, after its first evaluation
python3 run_one.py em32-new -- $M --eval-exact-match 32
(cd /tmp/old && timeout 115 python3 run_one.py em32-old -- $M --eval-exact-match 32)
