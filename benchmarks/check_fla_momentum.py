"""Momentum DeltaNet written as a mirasc spec against fla's own PyTorch references (on the CPU).

    PYTHONPATH=<fla 0.6.0 and einops> python benchmarks/check_fla_momentum.py

fla 0.6.0 ships `fla.ops.momentum_delta_rule`: M_t = mu_t M_{t-1} + eta_t k_t^T (alpha_t p_t S_{t-1} - v_t),
S_t = alpha_t S_{t-1} - beta_t M_t (with its default use_p_times_alpha=True). With p = k and beta = 1 this
is mirasc's `bias l2`, `retention decay(alpha)`, `algorithm momentum(beta=mu, lr=eta, chunk=1,
at=retained)`: the l2 gradient k^T (k (alpha S) - v) taken at the retained state. The script runs the
generated reference backend (float64) and fla's recurrent and chunked references (they compute in
float32) on the same random inputs and prints the relative differences of the outputs and both final
states, then the same for the generated torch and triton (interpreter) backends against the reference.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirasc.testing import compile_module, make_state, rel

SPEC = """layer MomentumDeltaNet {
    heads 2
    key_dim 16
    value_dim 16
    memory linear
    gate eta   : head = sigmoid(rank=4, init=0.5)
    gate alpha : head = sigmoid(rank=4, init=0.97)
    gate mu    : head = sigmoid(rank=4, init=0.9)
    bias l2
    retention decay(alpha)
    algorithm momentum(beta=mu, lr=eta, chunk=1, at=retained)
}
"""


def main() -> int:
    from fla.ops.momentum_delta_rule import chunk_momentum_delta_rule_ref, recurrent_momentum_delta_rule_ref

    module, compiled = compile_module(SPEC, "momentum_deltanet.miras", tempfile.mkdtemp())
    B, T, H, D = 2, 100, 2, 16
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    eta = 0.2 + 0.6 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    alpha = 0.9 + 0.1 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    mu = 0.5 + 0.45 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    s0, m0 = make_state(compiled.ir, B, H, D, D, gen=gen)
    o_ref, (s_ref, m_ref) = module.memory(q, k, v, eta=eta, alpha=alpha, mu=mu, initial_state=(s0, m0),
                                          output_final_state=True, backend="reference")
    common = {"q": q, "k": k, "v": v, "log_alpha": alpha.log(), "log_mu": mu.log(), "p": alpha[..., None] * k,
              "beta": torch.ones_like(eta), "eta": eta, "scale": 1.0, "initial_S": s0, "initial_M": m0,
              "output_final_state": True}
    print("mirasc reference (float64) against fla's references (float32): relative difference")
    print("| fla reference | o | S | M |\n|---|---|---|---|")
    worst = 0.0
    for name, fn, extra in (("recurrent_momentum_delta_rule_ref", recurrent_momentum_delta_rule_ref, {}),
                            ("chunk_momentum_delta_rule_ref (chunk 16)", chunk_momentum_delta_rule_ref,
                             {"chunk_size": 16})):
        args = dict(common, **extra)
        o, fin = fn(**args)
        errs = (rel(o.double(), o_ref), rel(fin[0].double(), s_ref), rel(fin[1].double(), m_ref))
        worst = max(worst, *errs)
        print(f"| {name} | {errs[0]:.1e} | {errs[1]:.1e} | {errs[2]:.1e} |")
    print("\nmirasc backends against its reference (torch in float64, triton in fp32)")
    for backend in ("torch", "triton"):
        dt = torch.float32 if backend == "triton" else torch.float64
        o, (s, m) = module.memory(*(x.to(dt) for x in (q, k, v)), eta=eta.to(dt), alpha=alpha.to(dt),
                                  mu=mu.to(dt), initial_state=(s0.to(dt), m0.to(dt)),
                                  output_final_state=True, backend=backend)
        print(f"{backend}: o {rel(o, o_ref):.1e}  S {rel(s, s_ref):.1e}  M {rel(m, m_ref):.1e}")
    ok = worst < 1e-5
    print("\nPASS" if ok else f"\nFAIL: worst {worst:.1e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
