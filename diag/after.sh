# Diagnostics after gpu_check: the segfault's native backtrace and ncu of both tensor-core kernels.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
echo "== cuda-gdb backtrace of diag/segv.py"
timeout 60 cuda-gdb -batch -ex run -ex bt --args python3 diag/segv.py 2>&1 | grep -vE "^\[(New )?Thread|Detaching|^warning" | head -60
for path in bmma bmma_async; do
  echo "== ncu $path (64x56x56, batch 256, zero padding)"
  timeout 60 ncu --kernel-name regex:binary_conv2d_bmma --launch-skip 1 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis python3 diag/perf.py one $path 2>&1 \
    | grep -vE "^==PROF==|^\s*$|----" | grep -E "Throughput|Duration|Stall|Cycles|Occupancy|Warps|Bandwidth|Hit|OPT|speedup|Speedup" | head -30
done
} > $OUT/diag.txt 2>&1
head -c 5000 $OUT/diag.txt
