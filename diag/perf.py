import sys, statistics, torch
from cuda_ext import ops
from cuda_ext.benchmarks import time_ms
dev = torch.device("cuda")
x = torch.randn(256, 64, 56, 56, device=dev).contiguous(memory_format=torch.channels_last)
w = torch.randn(64, 64, 3, 3, device=dev)
px, pw = ops.pack_signs(x), ops.pack_signs(w)
if sys.argv[1:2] == ["one"]:
    with ops.forced_cuda_path(sys.argv[2]):
        for _ in range(3):
            ops.binary_conv2d(px, pw, 64, 1, 1, 0.0)
    torch.cuda.synchronize(); sys.exit()
for path in ops.cuda_paths():
    for pad, pv in ((1, 0.0), (1, 1.0), (0, 0.0)):
        with ops.forced_cuda_path(path):
            t = time_ms(lambda: ops.binary_conv2d(px, pw, 64, 1, pad, pv), dev, 10)
        print(f"{path:>10} pad={pad} pad_value={pv}: {t:.4f} ms", flush=True)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    for _ in range(3):
        ops.binary_conv2d(px, pw, 64, 1, 1, 0.0)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
