import sys, torch
sys.path.insert(0, "tests")
from conftest import tiny_model
from kvstore.engine import Engine
from kvstore.sampling import SamplingParams
import kvstore.cuda_graph as cg
diffs = []
orig = cg.DecodeGraphs.run
def run(self, plan, inputs, forward):
    out = orig(self, plan, inputs, forward).clone()
    torch.cuda.synchronize()
    ref = forward(plan)
    diffs.append((plan.seq_ids.numel(), float((out.float() - ref.float()).abs().max())))
    return out
cg.DecodeGraphs.run = run
for dtype in (torch.float32, torch.bfloat16):
    diffs.clear()
    model = tiny_model("llama", dtype=dtype).cuda()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in [300, 70, 150, 33, 500]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True) for n in [12, 30, 7, 20, 16]]
    with Engine(model, "quant", max_batch=3) as e:
        got = e.generate(prompts, params); print(dtype, "path", e.decode_path, "captures", e.graphs and e.graphs.captures)
    print("same-plan eager vs replay max diff per step:", diffs[:12])
    with Engine(model, "quant", max_batch=3, cuda_graphs=False) as e:
        want = e.generate(prompts, params)
    print("tokens equal", [a.token_ids == b.token_ids for a, b in zip(got, want)], "logprobs equal", [a.logprobs == b.logprobs for a, b in zip(got, want)])
