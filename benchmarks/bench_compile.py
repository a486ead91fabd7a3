"""Generated layers under torch.compile and CUDA graphs on the GPU: agreement with eager, then speed.

    python benchmarks/bench_compile.py            # writes $OUT/compile.md when $OUT is set
    python benchmarks/bench_compile.py --smoke    # tiny shapes in Triton's CPU interpreter (aot_eager)

For each layer (RetNet: dot + decay chunk 64; Gated DeltaNet: l2, chunk 1, at=retained; an lp(p=3)
layer with a decay gate; any others that have triton kernels), at B=8, T=2048, d_model=1024, H=16,
K=V=64 in bf16 autocast:
  - the whole block under torch.compile(fullgraph=True) (Inductor): forward and backward must equal the
    eager block (relative error of the output and of every parameter gradient < 1e-2, or under twice
    the eager block's own bf16 error where that is larger: the "bf16 vs fp32" column, eager under
    autocast against eager in float32 on the torch backend, says how far bf16 rounding alone moves
    this layer, and a compiled block rounds differently; fullgraph=True turns any graph break into an
    error, reported in the table);
  - memory() forward captured in a CUDA graph (torch.cuda.graph) and replayed on new inputs copied into
    the static buffers: the replay must equal an eager call;
  - the block compiled with mode="reduce-overhead" (Inductor's CUDA graphs), fwd+bwd agreement again;
  - times (median of triton.testing.do_bench, ms): eager and compiled block fwd+bwd, memory() eager and
    graph-replayed forward.
Each figure is printed as it is measured; one layer's failure does not stop the others.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import import_spec, lp_decay_spec, median_ms, rel
from mirasc.testing import long_sequence_range, make_inputs

B, T, D_MODEL, H, K = (1, 24, 32, 2, 16) if SMOKE else (8, 2048, 1024, 16, 64)
DEV = "cpu" if SMOKE else "cuda"
COMPILE_BACKEND = "aot_eager" if SMOKE else "inductor"

def load(text: str, name: str, out: Path):
    return import_spec(text, name, out, "_bench_compile_")


def layers(out: Path) -> list:
    found = []
    for stem in ("retnet", "gated_deltanet", "log_cosh", "quantile"):
        path = ROOT / "examples" / f"{stem}.miras"
        module, ir = load(path.read_text(), str(path), out)
        if hasattr(module, "_chunk_fwd_kernel"):
            found.append((stem, module, ir))
        else:
            print(f"# {stem}: no triton kernels, skipped", flush=True)
    module, ir = load(lp_decay_spec(H, K), "lp_decay.miras", out)
    found.append(("lp(p=3) + decay", module, ir))
    return found




def block_fwd_bwd(block, x, autocast: bool = True):
    def run():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast and not SMOKE):
            y, _ = block(x)
        y.float().square().mean().backward()
        return y
    return run


def block_check(module, ir, mode) -> tuple[float, float, float, float, float]:
    """(rel err of y, worst rel err of a parameter gradient, the eager block's own bf16 error (the worse
    of y and the gradients, against float32), eager ms, compiled ms) of fwd+bwd."""
    torch.manual_seed(0)
    cls = getattr(module, ir.name)
    block = cls(D_MODEL, heads=H, key_dim=K, value_dim=K, backend="triton").to(DEV)
    x = torch.randn(B, T, D_MODEL, device=DEV)
    block.backend = "torch"  # the float32 reference: the torch backend, no fp32 kernels to compile
    y32 = block_fwd_bwd(block, x, autocast=False)()
    grads32 = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    block.backend = "triton"
    y = block_fwd_bwd(block, x)()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    cond = max(rel(y, y32), *(rel(grads[n], grads32[n]) for n in grads))
    eager_ms = median_ms(block_fwd_bwd(block, x), SMOKE)
    block.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=COMPILE_BACKEND,
                             **({"mode": mode} if mode and not SMOKE else {}))
    run = block_fwd_bwd(compiled, x)
    for _ in range(3):  # warm up (reduce-overhead records its graphs on the first calls)
        block.zero_grad()
        cy = run()
    g_err = max(rel(p.grad, grads[n]) for n, p in block.named_parameters())
    return rel(cy, y), g_err, cond, eager_ms, median_ms(run, SMOKE)


def graph_check(module, ir) -> tuple[float, float, float]:
    """memory() forward in a CUDA graph: (rel err of a replay on new inputs, eager ms, replay ms)."""
    if SMOKE:
        return float("nan"), float("nan"), float("nan")
    gen = torch.Generator(device=DEV).manual_seed(3)

    def draw():
        q, k, v, params, _ = make_inputs(ir, B, T, H, K, K, dtype=torch.float32, device=DEV, gen=gen,
                                         ranges=long_sequence_range)
        return q.bfloat16(), k.bfloat16(), v.bfloat16(), params

    q, k, v, params = draw()
    call = lambda: module.memory(q, k, v, **params, backend="triton")[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    q2, k2, v2, params2 = draw()
    for dst, src in zip((q, k, v, *params.values()), (q2, k2, v2, *params2.values())):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    ref = module.memory(q2, k2, v2, **params2, backend="triton")[0]
    return rel(out, ref), median_ms(call, SMOKE), median_ms(graph.replay, SMOKE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's CPU interpreter")
    ap.parse_args()
    head = (f"# torch.compile and CUDA graphs: B={B}, T={T}, d_model={D_MODEL}, H={H}, K=V={K}, "
            f"{'fp32 (smoke)' if SMOKE else 'bf16 autocast'}; "
            f"{torch.cuda.get_device_name() if not SMOKE else 'CPU interpreter'}; torch {torch.__version__}")
    columns = "| layer | what | rel err y | worst rel err grad / replay | bf16 vs fp32 (eager) | eager ms | compiled ms |"
    lines = [head, "", columns, "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for label, module, ir in layers(Path(tmp)):
            for what, fn, extra in (("block, compile(fullgraph) fwd+bwd", block_check, (None,)),
                                    ("block, reduce-overhead fwd+bwd", block_check, ("reduce-overhead",)),
                                    ("memory() fwd, CUDA graph replay", graph_check, ())):
                try:
                    r = fn(module, ir, *extra)
                    if len(r) == 5:
                        ey, eg, cond, t0, t1 = r
                        bar = max(1e-2, 2 * cond)
                        good = ey < bar and eg < bar
                        row = f"| {label} | {what} | {ey:.1e} | {eg:.1e} | {cond:.1e} | {t0:.3f} | {t1:.3f} |"
                    else:
                        er, t0, t1 = r
                        good = not er > 1e-2
                        row = f"| {label} | {what} | - | {er:.1e} | - | {t0:.3f} | {t1:.3f} |"
                    ok &= good
                    row += "" if good else " FAIL"
                except Exception as exc:  # noqa: BLE001 -- report it and go on with the next check
                    traceback.print_exc()
                    ok = False
                    first_line = (str(exc).splitlines() or [""])[0][:120]
                    row = f"| {label} | {what} | failed: {type(exc).__name__}: {first_line} | | | | |"
                print(row, flush=True)
                lines.append(row)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "compile.md").write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
