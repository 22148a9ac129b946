# Session 22 call 1: sparse attention inside the caching warm-up (attention warm-up 0/2/4/9 on caching schedules)
. benchmarks/gpu_env.sh > /dev/null || exit 1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
P=.probe/plans
mkdir -p out; timeout -s INT $((545 - SECONDS)) python3 -m benchmarks.quality --workload long --out out/e1 --plan-files \
  $P/c9.json $P/c9-r90-a2.json $P/c9-r90-a0.json $P/c9-r85-a2.json $P/c9-r90-a9.json $P/c7.json $P/c9-r90-a4.json \
  $P/c9-r80-a2.json $P/c4.json $P/c7-r90-a2.json $P/c9-d20-a2.json $P/c7-r85-a2.json $P/c9s3-r85-a2.json $P/c12s4-r85-a2.json \
  $P/c9s3-r90-a2.json $P/c8s4.json > out/e1.log 2>&1
python3 -m benchmarks.quality --workload long --out out/e1 --report-only > /dev/null 2>&1
cp out/e1.log out/e1/{table.md,quality.jsonl} $OUT/
grep -i "warn\|error" out/e1.log | head -5; grep -v "^$" out/e1/table.md | grep "|" | cut -d'|' -f2-10
