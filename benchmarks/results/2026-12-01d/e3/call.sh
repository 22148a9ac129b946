# Session 22 call 3: the caching-only frontier at 4-5.3x, and sparse attention on short-warm-up caching schedules
. benchmarks/gpu_env.sh > /dev/null || exit 1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
P=.probe/plans3
mkdir -p out; timeout -s INT $((545 - SECONDS)) python3 -m benchmarks.quality --workload long --out out/e3 --plan-files \
  $P/c4-d20-a4-ea.json $P/c4k6.json $P/c4k7.json $P/c3k5.json $P/c5-d20-a5.json $P/c4s4-d20-a4.json $P/c4-d30-a4.json $P/c4-d10-a4-ea.json $P/c3k6.json $P/c5k7.json $P/c3k4.json $P/c3k9.json $P/c4k11.json $P/c5k8.json $P/c6k8.json $P/c3-d20-a3.json $P/c5k4-d20-a5.json > out/e3.log 2>&1
python3 -m benchmarks.quality --workload long --out out/e3 --report-only > /dev/null 2>&1
cp out/e3.log out/e3/{table.md,quality.jsonl} $OUT/
grep -i "warn\|error" out/e3.log | head -5; grep -v "^$" out/e3/table.md | grep "|" | cut -d'|' -f2-10
