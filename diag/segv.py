import faulthandler, sys, torch
faulthandler.enable()
from cuda_ext import ops
from cuda_ext.reference import pack_weight_ref
px = ops.pack_signs(torch.randn(1, 64, 4, 4, device="cuda"))
pw = pack_weight_ref(torch.randn(3, 64, 3, 3))
for name, call in [("w on cpu", lambda: ops.binary_conv2d(px, pw, 64)),
                   ("scale cpu", lambda: ops.binary_conv2d(px, pw.cuda(), 64, scale=torch.ones(3))),
                   ("in_channels 65", lambda: ops.binary_conv2d(px, pw.cuda(), 65)),
                   ("in_channels 65 on cpu", lambda: ops.binary_conv2d(px.cpu(), pw, 65))]:
    print("calling:", name, flush=True)
    try:
        call()
        print("  no error?!", flush=True)
    except RuntimeError as e:
        print("  RuntimeError:", str(e).splitlines()[0], flush=True)
