# The Countdown data of this experiment, made the same on every machine:
# 2,000 solvable puzzles (3 or 4 numbers up to 100, targets up to 100,
# seed 1505); the first 250 are held out (never mined, never trained on),
# the rest are the mining pool. Sourced by run.sh and pilot.sh with OUT set.
"$R" data countdown --count 2000 --numbers 3..=4 --max-number 100 --max-target 100 \
    --seed 1505 --out "$OUT/countdown.jsonl" --overwrite
head -n 250 "$OUT/countdown.jsonl" >"$OUT/heldout.jsonl"
tail -n +251 "$OUT/countdown.jsonl" >"$OUT/pool.jsonl"
