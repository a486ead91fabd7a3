"""What the causal LM keeps for the backward, per token: the token-proportional tensors saved by one
forward's autograd graph, grouped by the operation that saved them (on the CPU, bf16 autocast).

    PYTHONPATH=. python benchmarks/saved_activations.py [--spec gated_deltanet] [--preset gpu-340m] [--seq 512]

One layer at the preset's width (plus the embedding and the head), one row of --seq tokens. Each saved
tensor is counted once per storage; parameters (and autocast's copies of them) are left out, as is
anything without a token axis. The memory layer runs its CPU backend here (torch), whose internals differ
from the Triton kernels' on a GPU; the norms, the MLP and the block around the memory are the same.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirasc.train.trainer import build_model, make_config


def saved_by_op(loss: torch.Tensor, T: int, skip: set) -> collections.Counter:
    """Bytes of the saved tensors with a token axis of length T (or T + 3, a convolution window's),
    by (autograd node, dtype), walking the graph from loss."""
    seen, by, stack, visited = set(skip), collections.Counter(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        names = [n for n in dir(node) if n.startswith("_saved_")]
        names += ["saved_tensors"] if hasattr(node, "saved_tensors") else []  # custom autograd functions
        for name in names:
            try:
                val = getattr(node, name)
            except (RuntimeError, AttributeError):  # freed or not a tensor attribute
                continue
            for t in val if isinstance(val, (tuple, list)) else [val]:
                if not isinstance(t, torch.Tensor) or t.numel() <= 1:
                    continue
                ptr = t.untyped_storage().data_ptr()
                if ptr in seen or not (T in t.shape or T + 3 in t.shape):
                    continue
                seen.add(ptr)
                by[(type(node).__name__, str(t.dtype).removeprefix("torch."))] += t.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return by


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="gated_deltanet")
    ap.add_argument("--preset", default="gpu-340m")
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(make_config(ROOT / "examples" / f"{args.spec}.miras", preset=args.preset, layers=1), 256)
    ids = torch.randint(0, 256, (1, args.seq + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    by = saved_by_op(loss, args.seq, params)
    total = sum(by.values())
    print(f"# {args.spec}, preset {args.preset} width, 1 layer + embedding and head: "
          f"{total / args.seq / 1024:.1f} KiB per token kept for the backward\n")
    print("| saved by | dtype | KiB / token |\n|---|---|---|")
    for (op, dtype), nbytes in by.most_common():
        print(f"| {op} | {dtype} | {nbytes / args.seq / 1024:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
