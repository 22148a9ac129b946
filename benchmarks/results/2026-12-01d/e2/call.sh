# Session 22 call 2: sparse attention on caching schedules' late computed steps, and the dropped-block estimate in early steps
. benchmarks/gpu_env.sh > /dev/null || exit 1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
P=.probe/plans2
mkdir -p out; timeout -s INT $((545 - SECONDS)) python3 -m benchmarks.quality --workload long --out out/e2 --plan-files \
  $P/c9-d20-a9.json $P/c7-d20-a7.json $P/c4s4.json $P/c4-d20-a4.json $P/c9-r90-a4-ea.json $P/c9-r90-a2-ea.json \
  $P/c7-r90-a7-ea.json $P/c9-d10-a9-ea.json $P/c7-d10-a7-ea.json $P/c4-r90-a4-ea.json $P/c2.json $P/c9-r95-a2-em.json $P/c9-r95-a4-ea.json > out/e2.log 2>&1
python3 -m benchmarks.quality --workload long --out out/e2 --report-only > /dev/null 2>&1
cp out/e2.log out/e2/{table.md,quality.jsonl} $OUT/
grep -i "warn\|error" out/e2.log | head -5; grep -v "^$" out/e2/table.md | grep "|" | cut -d'|' -f2-10
