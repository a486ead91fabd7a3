"""The fused decode step on the GPU: agreement with the torch step, then the time of one step() call.

    python benchmarks/bench_step.py            # writes $OUT/step.md when $OUT is set
    TRITON_INTERPRET=1 python benchmarks/bench_step.py --smoke   # a CPU dry run of the script's paths

Layers: the example specs with a fused step (RetNet, DeltaNet, Gated DeltaNet, Momentum DeltaNet; the
MLP memories of Titans, Moneta, Yaad and TTT-Linear), an lp(p=3) layer with a decay gate and the same
layer with each retention map (kl, bregman, elastic net), at B=8, H=16, K=V=64, bf16 inputs, decoding
from a random state.
Agreement: 16 tokens decoded with backend="triton" and backend="torch" from one random state; the
relative error (norm over all elements) of the outputs and of the final state must stay below 1e-2.
Speed, per step() call, for each backend (ms):
  - GPU time: triton.testing.do_bench (median). It clears the L2 cache before each call, and the CPU
    launches the step while that clearing kernel runs, so this is the GPU's time, not the host's;
  - wall time: a loop of 500 step() calls that carries the DecodeState, synchronised once at the end:
    what a decode loop pays, Python and launch overhead included;
  - CUDA graph: one step() captured in a CUDA graph and replayed (do_bench median), when capture works.
Layers at chunk sizes above 1 are timed inside a chunk (pos 1), where the base state is read too.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import import_spec, lp_decay_spec, rel
from mirasc.testing import flatten_state, long_sequence_range, make_inputs, make_state


def load(text: str, name: str, out: Path):
    return import_spec(text, name, out, "_bench_step_")


def layers(out: Path) -> list:
    """(label, module, ir) of every layer that has a fused step."""
    found = []
    for stem in ("retnet", "deltanet", "gated_deltanet", "momentum_deltanet", "titans", "moneta", "yaad",
                 "ttt_linear", "memora"):
        path = ROOT / "examples" / f"{stem}.miras"
        module, ir = load(path.read_text(), str(path), out)
        if hasattr(module, "_step_kernel"):
            found.append((f"{ir.name} ({ir.bias.name}, chunk {ir.algorithm.chunk})", module, ir))
        else:
            print(f"# {stem}: no fused step kernel, skipped")
    module, ir = load(lp_decay_spec(16, 64), "lp_decay.miras", out)
    found.append((f"lp(p=3) + decay gate (chunk {ir.algorithm.chunk})", module, ir))
    for name, retention in (("kl", "kl(axis=key)"), ("bregman", "bregman"), ("elastic_net", "elastic_net(gamma=0.001)")):
        text = lp_decay_spec(16, 64).replace("retention decay(a)", f"retention decay(a) + {retention}")
        if text == lp_decay_spec(16, 64):
            raise RuntimeError("lp_decay_spec changed its retention line; update bench_step.py")
        module, ir = load(text, f"lp_decay_{name}.miras", out)
        found.append((f"lp(p=3) + decay + {retention} (chunk {ir.algorithm.chunk})", module, ir))
    return found


def token_inputs(ir, B, H, K, V, dev, dtype, gen):
    """One token: q, k (unit norm), v in dtype and every runtime parameter in float32."""
    q, k, v, params, _ = make_inputs(ir, B, 1, H, K, V, dtype=torch.float32, device=dev, gen=gen,
                                     ranges=long_sequence_range)
    return (q[:, 0].to(dtype), k[:, 0].to(dtype), v[:, 0].to(dtype),
            {n: (p if p.dim() == 1 else p[:, 0]) for n, p in params.items()})


def agreement(module, ir, B, H, K, V, dev, dtype, n=16) -> tuple[float, float]:
    gen = torch.Generator(device=dev).manual_seed(1)
    s0 = make_state(ir, B, H, K, V, dtype=torch.float32, gen=gen, device=dev)
    toks = [token_inputs(ir, B, H, K, V, dev, dtype, gen) for _ in range(n)]
    outs, finals = {}, {}
    with torch.no_grad():
        for backend in ("triton", "torch"):
            state, os_ = module.decode_state(s0), []
            for q, k, v, params in toks:
                o, state = module.step(q, k, v, **params, state=state, backend=backend)
                os_.append(o)
            outs[backend], finals[backend] = torch.stack(os_), torch.cat([x.flatten() for x in flatten_state(state.state)])
    return rel(outs["triton"], outs["torch"]), rel(finals["triton"], finals["torch"])


def wall_ms(fn, n: int, sync, warm: int = 1) -> float:
    for _ in range(warm):  # a whole chunk: its last token compiles a kernel variant of its own
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n * 1e3


def time_backend(module, ir, backend, B, H, K, V, dev, dtype, smoke: bool) -> dict:
    gen = torch.Generator(device=dev).manual_seed(2)
    s0 = make_state(ir, B, H, K, V, dtype=torch.float32, gen=gen, device=dev)
    q, k, v, params = token_inputs(ir, B, H, K, V, dev, dtype, gen)
    state = module.decode_state(s0)
    with torch.no_grad():
        if ir.algorithm.chunk > 1:  # time inside a chunk: the base state is read as well
            _, state = module.step(q, k, v, **params, state=state, backend=backend)

        def one():
            return module.step(q, k, v, **params, state=state, backend=backend)

        carried = [state]

        def carry():  # a decode loop: each call continues from the last one's state
            carried[0] = module.step(q, k, v, **params, state=carried[0], backend=backend)[1]
            if carried[0].pos == 0 and ir.algorithm.chunk > 1:
                carried[0] = state  # stay inside the chunk, as the timed step does

        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        res = {"wall": wall_ms(carry, 20 if smoke else 500, sync, warm=ir.algorithm.chunk + 1)}
        if smoke:
            res["gpu"] = wall_ms(one, 20, sync)
            res["graph"] = "n/a: CPU dry run"
            return res
        import triton.testing

        res["gpu"] = triton.testing.do_bench(one, return_mode="median")
        try:
            o_eager, _ = one()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
                for _ in range(3):
                    one()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                o_graph, _ = one()
            graph.replay()
            torch.cuda.synchronize()
            err = rel(o_graph.float(), o_eager.float())
            if err > 1e-3:
                raise RuntimeError(f"the replayed graph's output differs from eager (rel {err:.1e})")
            res["graph"] = triton.testing.do_bench(graph.replay, return_mode="median")
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            res["graph"] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    return res


def fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("bench_step.py needs a CUDA device (or --smoke under TRITON_INTERPRET=1)")
        return 2
    B, H, K, V = (2, 2, 16, 16) if args.smoke else (8, 16, 64, 64)
    dtype = torch.bfloat16
    import triton

    where = "CPU dry run" if args.smoke else torch.cuda.get_device_name()
    title = (f"# Fused decode step: B={B}, H={H}, K={K}, V={V}, bf16 inputs, fp32 state; {where}; "
             f"torch {torch.__version__}, triton {triton.__version__}")
    legend = ("ms per step() call. GPU: do_bench median (L2 cleared, launch hidden); wall: a 500-call "
              "decode loop, host overhead included; graph: one step replayed from a CUDA graph.")
    header = ("| layer | rel err o / state (triton vs torch) | triton GPU | triton wall | triton graph "
              "| torch GPU | torch wall | torch graph |")
    lines = [title, "", legend, "", header, "|---|---|---|---|---|---|---|---|"]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for label, module, ir in layers(Path(tmp)):
            try:
                e_o, e_s = agreement(module, ir, B, H, K, V, dev, dtype)
                ok = e_o < 1e-2 and e_s < 1e-2
                failed |= not ok
                cells = [f"{e_o:.1e} / {e_s:.1e}{'' if ok else ' FAIL'}"]
                for backend in ("triton", "torch"):
                    r = time_backend(module, ir, backend, B, H, K, V, dev, dtype, args.smoke)
                    cells += [fmt(r["gpu"]), fmt(r["wall"]), fmt(r["graph"])]
            except Exception:  # noqa: BLE001 - one layer's failure is reported, the others still run
                traceback.print_exc()
                failed = True
                cells = ["error (see log)"] + [""] * 6
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "step.md").write_text(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
