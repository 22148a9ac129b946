# Session 22 call 5: held-out rows of the two plans the 5x calibration measured at >= 5x with the best PSNR (its row was cut off)
. benchmarks/gpu_env.sh > /dev/null || exit 1
timeout -s INT $((200 - SECONDS)) python3 -m benchmarks.quality --workload long --out out/e5 --plan-files .probe/plans5/cal5-w4k4.json .probe/plans5/cal5-w4k5c1.json > out/e5.log 2>&1
python3 -m benchmarks.quality --workload long --out out/e5 --report-only > /dev/null 2>&1
cp out/e5.log out/e5/{table.md,quality.jsonl} $OUT/
grep -v "^$" out/e5/table.md | grep "|" | cut -d'|' -f2-10
