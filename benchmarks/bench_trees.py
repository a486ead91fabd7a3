"""Triton kernel timings of the examples with the mirasc of one source tree, to compare two trees (before and
after a change of the code generator) in the same run on the same GPU.

    python benchmarks/bench_trees.py --tree PATH [--label NAME] [--specs gated_deltanet quantile ...]

Compiles each example of PATH/examples with PATH's mirasc and times memory(backend="triton") forward and
forward+backward (median of triton.testing.do_bench) at B=8, T=2048, H=16, K=V=64 in bf16 with the
example's chunk size. A spec with `lq(...)` is timed with `norm=token` where the tree knows that argument
(the rule its MLP kernels implement). Prints one markdown row per example: label, example, fwd ms, fwd+bwd ms.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", required=True)
    ap.add_argument("--label", default=None)
    ap.add_argument("--specs", nargs="+", default=["gated_deltanet", "retnet", "quantile", "log_cosh", "titans",
                                                   "moneta", "yaad", "ttt_linear"])
    args = ap.parse_args()
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    compiler = importlib.import_module("mirasc.compiler")
    label = args.label or tree.name
    for name in args.specs:
        try:
            f, b = time_spec(compiler, tree, name)
            print(f"| {label} | {name} | {f:.3f} | {b:.3f} |", flush=True)
        except Exception as exc:  # noqa: BLE001 -- one failing example must not stop the others
            msg = str(exc).splitlines()[0][:120] if str(exc) else ""
            print(f"| {label} | {name} | {type(exc).__name__}: {msg} | |", flush=True)


def spec_text(compiler, tree: Path, name: str) -> str:
    """The example's text; lq(...) as lq(norm=token, ...) where the tree knows the argument."""
    text = (tree / "examples" / f"{name}.miras").read_text()
    if "lq(" not in text:
        return text
    token = text.replace("lq(", "lq(norm=token, ")
    try:
        compiler.compile_spec(token, f"{name}.miras")
    except Exception:  # noqa: BLE001 -- a tree without the norm argument: its only rule is per token
        return text
    return token


def time_spec(compiler, tree: Path, name: str, B: int = 8, T: int = 2048, H: int = 16, D: int = 64):
    """(fwd ms, fwd+bwd ms) of the example's memory() on the triton backend."""
    import torch
    import triton

    compiled = compiler.compile_spec(spec_text(compiler, tree, name), f"{name}.miras")
    out = Path(tempfile.mkdtemp()) / f"{compiled.stem}.py"
    out.write_text(compiled.source)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", out)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    ir = compiled.ir
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, D, device="cuda", generator=g), dim=-1)
            .to(torch.bfloat16).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    gates = {}
    for p in ir.inputs():
        lo, hi = (0.999, 0.9999) if p.activation == "sigmoid" else (0.005, 0.02)
        shape = (H,) if p.kind == "learnable" else (B, T, H) if p.shape == "head" else (B, T, H, D)
        gates[p.name] = (lo + (hi - lo) * torch.rand(shape, device="cuda", generator=g)).requires_grad_()
    state = None
    if ir.memory.kind == "mlp":
        shapes = mod._layer_shapes(D, D) * (2 if ir.algorithm.kind == "momentum" else 1)
        state = tuple((torch.randn(B, H, a, b, device="cuda", generator=g) / a ** 0.5).requires_grad_()
                      for a, b in shapes)

    def fwd():
        return mod.memory(q, k, v, **gates, initial_state=state, backend="triton")[0]

    def both():
        fwd().float().sum().backward()

    with torch.no_grad():
        f = triton.testing.do_bench(fwd, warmup=25, rep=100)
    return f, triton.testing.do_bench(both, warmup=25, rep=100)


if __name__ == "__main__":
    main()
