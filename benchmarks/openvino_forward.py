"""Raw image-tower forward of open_clip ViT-B-32 (random weights): torch fp32/bf16 vs OpenVINO
fp32/bf16/int8, each with the LATENCY hint (one synchronous call per batch) and with the THROUGHPUT
hint + AsyncInferQueue (the batch split over the plugin's infer requests). Batch 64, 3 interleaved
rounds in one process; ratios to torch fp32 eager; cosine of each output to torch fp32 (min over rows).
int8: nncf post-training quantization, ModelType.TRANSFORMER + smooth quant alpha 0.95, calibrated on
8 batches of 8 Gaussian-noise images (this script only; the runtime calibrates on real photos).

    python benchmarks/openvino_forward.py [MODEL]
"""
import sys
import time

import nncf
import numpy as np
import open_clip
import openvino as ov
import torch

torch.set_num_threads(2)
name = sys.argv[1] if len(sys.argv) > 1 else "ViT-B-32"
torch.manual_seed(0)
model = open_clip.create_model(name, pretrained=None).eval()
vis = model.visual.requires_grad_(False)
x = torch.randn(64, 3, 224, 224)
t = time.time()
with torch.no_grad():
    ovm = ov.convert_model(vis, example_input=x[:1], input=[-1, 3, 224, 224])
print("convert", time.time() - t, flush=True)
core = ov.Core()
rng = np.random.default_rng(0)
calib = [torch.randn(8, 3, 224, 224).numpy() for _ in range(8)]
t = time.time()
q = nncf.quantize(ovm, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER, subset_size=64,
                  advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=0.95))
print("quantize", time.time() - t, flush=True)
with torch.no_grad():
    ref = vis(x).numpy()
def cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True); b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())
variants = {}
for label, m, prec in [("ov_fp32", ovm, "f32"), ("ov_bf16", ovm, "bf16"), ("ov_int8", q, "f32"), ("ov_int8_bf16", q, "bf16")]:
    c = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": prec, "PERFORMANCE_HINT": "LATENCY"})
    out = c(x.numpy())[0]
    print(label, "cos", cos(out, ref), flush=True)
    variants[label] = lambda c=c: c(x.numpy())
    ct = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": prec, "PERFORMANCE_HINT": "THROUGHPUT"})
    nreq = ct.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    queue = ov.AsyncInferQueue(ct, nreq)
    def run_async(queue=queue, nreq=nreq):
        for part in np.array_split(x.numpy(), max(nreq, 2)):
            queue.start_async(part)
        queue.wait_all()
    print(label, "nreq", nreq, ct.get_property("NUM_STREAMS"), flush=True)
    variants[label + "_tput"] = run_async
bf = vis.to(torch.bfloat16)
import copy

vis32 = copy.deepcopy(vis).float()
def torch_fp32():
    with torch.inference_mode(): vis32(x)
xb = x.to(torch.bfloat16)
def torch_bf16():
    with torch.inference_mode(): bf(xb)
variants["torch_fp32"] = torch_fp32
variants["torch_bf16"] = torch_bf16
for f in variants.values(): f()
times = {k: [] for k in variants}
for r in range(3):
    for k, f in variants.items():
        t = time.perf_counter(); f(); times[k].append(64 / (time.perf_counter() - t))
base = np.median(times["torch_fp32"])
for k, v in times.items():
    print(f"{k:20s} {np.median(v):7.1f} img/s  ratio {np.median(v)/base:.2f}  {[round(a,1) for a in v]}", flush=True)
