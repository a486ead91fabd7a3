"""Rendered lines of every MLP-memory kernel, against the code generator's budget (docs/codegen.md).

    python benchmarks/mlp_kernel_lines.py [--budget 150]

Renders the MLP examples (Moneta also as its lq(norm=token) variant), the MLP variants of
tests/test_triton_mlp.py and the extremes of the fuzzer's MLP draws (tests/fuzz_specs.py: depth 3, lq(q=3)
with decay, momentum, a learnable bias parameter), and prints the lines of each `@triton.jit def *_kernel`
(decorator to last line) as a markdown table. Exits 1 if a kernel is over the budget.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mirasc.compiler import compile_spec

EXAMPLES = ("titans", "moneta", "yaad", "ttt_linear")
FUZZ = {  # (retention, algorithm, a learnable bias parameter) at depth 3
    "fuzz_d3_lq_momentum": ("decay(alpha) + lq(q=3)", "momentum(beta=0.5, lr=eta, chunk=8)", True),
    "fuzz_d3_lq_gd": ("decay(alpha) + lq(q=3)", "gd(lr=eta, chunk=4)", False),
    "fuzz_d3_lq_token_momentum": ("decay(alpha) + lq(q=3, norm=token)", "momentum(beta=0.5, lr=eta, chunk=8)",
                                  False),
    "fuzz_d3_momentum": ("decay(alpha)", "momentum(beta=0.5, lr=eta, chunk=8)", True),
}


def _fuzz_spec(retention: str, algorithm: str, learnable: bool) -> str:
    lines = ["layer Fuzz {", "    heads 2", "    key_dim 8", "    value_dim 8",
             "    memory mlp(depth=3, expansion=2, act=gelu)", "    gate eta : head = softplus(rank=4, init=0.1)",
             "    gate alpha : head = sigmoid(rank=4, init=0.9)"]
    if learnable:
        lines += ["    param tau = learnable(0.5, sigmoid)", "    bias sum((y - v)^2) + tau * sum(y^2)"]
    else:
        lines.append("    bias l2")
    return "\n".join(lines + [f"    retention {retention}", f"    algorithm {algorithm}", "}", ""])


def specs():
    """(name, spec text) of every layer measured."""
    for name in EXAMPLES:
        yield name, (ROOT / "examples" / f"{name}.miras").read_text()
    yield "moneta-token", (ROOT / "examples" / "moneta.miras").read_text().replace("lq(q=4)", "lq(q=4, norm=token)")
    import test_triton_mlp as variants

    for name, variant in variants.VARIANTS.items():
        yield name, variant.spec(name)
    for name, (variant, _) in variants.LQ_CHUNK_CASES.items():
        yield f"lq_chunk_{name}", variant.spec(name)
    for name, args in FUZZ.items():
        yield name, _fuzz_spec(*args)


def kernel_lines(source: str) -> dict[str, int]:
    """Lines of each @triton.jit *_kernel of a generated module, decorator to last line."""
    lines = source.split("\n")
    out = {}
    for i, line in enumerate(lines):
        m = re.match(r"(\s*)def (\w+_kernel)\(", line)
        if not (m and i and "@triton.jit" in lines[i - 1]):
            continue
        indent, j = len(m.group(1)), i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
                                  or lines[j].strip().startswith(")")):
            j += 1
        while not lines[j - 1].strip():
            j -= 1
        out[m.group(2)] = j - i + 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=int, default=150)
    args = ap.parse_args()
    print("| layer | kernel | lines |\n|---|---|---:|")
    over = 0
    for name, text in specs():
        for kernel, n in kernel_lines(compile_spec(text, f"{name}.miras").source).items():
            if "_mlp_" in kernel:
                over += n > args.budget
                print(f"| {name} | {kernel} | {n}{' (over)' if n > args.budget else ''} |")
    print(f"\n{over} kernels over {args.budget} lines.")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
