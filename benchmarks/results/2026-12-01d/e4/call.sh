# Session 22 call 4: calibrated plans at 5x and 4x on the long model (plan space: sparse from the run's warm-up, estimate, spread by skip kind)
. benchmarks/gpu_env.sh > /dev/null || exit 1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout -s INT $((540 - SECONDS)) python3 -m benchmarks.quality --workload long --out out/e4 \
  --methods 'ditplan-calibrated/target=5x' 'ditplan-calibrated/target=4x' > out/e4.log 2>&1
python3 -m benchmarks.quality --workload long --out out/e4 --report-only > /dev/null 2>&1
cp out/e4.log out/e4/{table.md,quality.jsonl,calibration.jsonl} $OUT/; cp out/e4/plans/*.json $OUT/ 2>/dev/null
grep -i "warn\|error\|calibrated " out/e4.log | cut -c1-220 | tail -40; grep -v "^$" out/e4/table.md | grep "|" | cut -d'|' -f2-10
