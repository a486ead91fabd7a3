"""Compile every Triton kernel of the example layers for an H100 (sm_90), without a GPU.

    python benchmarks/check_sm90.py [--only NAME] [--jobs N] [--timeout S] [--spec FILE ...]

For each example with Triton kernels, the generated memory() (forward and backward; skipped for a layer
that has the fused step only) and step() run on CPU tensors at the real shapes with a stand-in for each
kernel that records its launch instead of running it. Each recorded launch is bound exactly as JITFunction.run binds it on a GPU (the same
specialization, constexprs and options), then compiled for sm_90 by triton.compile. Configurations:
head dims K = V = 64 (and 128 for matrix memories; --dims picks others), the spec's chunk size (plus 64 and 1 for matrix
memories), bf16 and fp32 inputs (LOWP as the launchers choose it); step() at a chunk's first token and
inside a chunk. Identical compilations of a layer are listed once. A spec with lq(norm=chunk) retention
(the default; Moneta) is compiled as it is and as its lq(..., norm=token) variant, listed as <stem>-token
(the MLP kernels' two lq rules). --spec FILE adds a spec outside examples/ (e.g. an MLP variant),
compiled the same way.

Prints a markdown table: compile result (or the error's first line), seconds, shared memory (flagged
over the H100's 232448 bytes per block), registers and spill bytes (ptxas -v). Exits 1 if a kernel
fails to compile (or takes over --timeout seconds) or needs too much shared memory. --only NAME keeps
one example (its stem) or one kernel (e.g. _step_kernel); --jobs N compiles N kernels at a time;
--dims, --dtypes and --chunks pick other configurations; --mlp-fwd / --mlp-bwd other launch settings of the
MLP kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import queue
import re
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the launchers must pick the GPU's LOWP, not the interpreter's
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="check_sm90_")  # cold compiles, fresh ptxas logs

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import import_spec

warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice on every compile

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory per block on an H100
KERNEL_SUFFIX = "_kernel"  # every @triton.jit function of a generated module named *_kernel is launched
B, H, T = 1, 16, 2048  # B only sets the grid; H and T as in the benchmarks (ints are specialized on value)
JOBS: list[dict] = []  # filled before the pool forks; workers compile JOBS[i]


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch, runs nothing."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def bind(kernel, args, kwargs) -> tuple:
    """(signature, constexprs, attrs, options) of a launch, as JITFunction.run computes them on a GPU."""
    backend = make_backend(TARGET)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # the options this Triton knows
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


def kernel_names(module) -> list[str]:
    """The module's Triton kernels: its jit functions named *_kernel (helpers are inlined into them)."""
    return sorted(n for n, f in vars(module).items()
                  if n.endswith(KERNEL_SUFFIX) and not n.startswith("_orig") and isinstance(f, triton.JITFunction))


def record(module, ir, K: int, dtype: torch.dtype, chunk: int) -> list:
    """The kernel launches of one memory() forward + backward and of step() at positions 0 and 1."""
    calls: list = []
    for name in module._kernel_names:
        setattr(module, name, Recorder(getattr(module, f"_orig{name}"), calls))
    grad = {"requires_grad": True}
    q, k, v = (torch.randn(B, T, H, K, dtype=dtype, **grad) for _ in range(3))
    gates = {p.name: torch.rand((H,) if p.kind == "learnable" else (B, T, H) if p.shape == "head"
                                else (B, T, H, K), **grad) for p in ir.inputs()}
    mlp = ir.memory.kind == "mlp"
    state = None
    if mlp:  # an MLP memory needs its initial weights (and momentum buffers)
        shapes = module._layer_shapes(K, K) * (2 if ir.algorithm.kind == "momentum" else 1)
        state = tuple(torch.zeros(B, H, a, b, **grad) for a, b in shapes)
    if any(n != "_step_kernel" for n in module._kernel_names):  # a layer may have the fused step only
        o, _ = module.memory(q, k, v, **gates, initial_state=state, chunk_size=chunk, backend="triton")
        o.float().sum().backward()  # the outputs are uninitialized: only the backward's launch matters
    if hasattr(module, "_orig_step_kernel") and K <= 128:  # the fused step refuses wider heads
        with torch.no_grad():
            qs, ks, vs = (torch.randn(B, H, K, dtype=dtype) for _ in range(3))
            sg = {n: g.detach()[:, 0] if g.dim() > 1 else g.detach() for n, g in gates.items()}
            st = module.decode_state(tuple(x.detach() for x in state)) if mlp else None  # an MLP needs W_0
            _, st = module.step(qs, ks, vs, **sg, state=st, chunk_size=chunk, backend="triton")
            if chunk > 1:  # inside a chunk: BASE_IS_Z (and WRITE_BASE at=retained) change
                module.step(qs, ks, vs, **sg, state=st, chunk_size=chunk, backend="triton")
    return calls


LQ_CHUNK = re.compile(r"\blq\(((?:(?!norm)[^)])*)\)")  # lq(...) without norm=: norm=chunk


def variants(path: Path):
    """(stem, spec text) of a spec file, then of its lq(norm=token) variant where it has lq(norm=chunk)."""
    text = path.read_text()
    yield path.stem, text
    if LQ_CHUNK.search(text):
        yield f"{path.stem}-token", LQ_CHUNK.sub(r"lq(\1, norm=token)", text)


def collect(only: str | None, dims: list[int], dtypes: list[str], chunk_list: list[int] | None,
            mlp_configs: dict | None = None, extra: list[str] | None = None) -> None:
    """Fill JOBS with one entry per distinct (layer, kernel compilation); mlp_configs replaces the MLP
    modules' launch settings (_MLP_FWD_CONFIG / _MLP_BWD_CONFIG); extra: more spec files."""
    out = Path(tempfile.mkdtemp(prefix="check_sm90_src_"))
    specs = [*sorted((ROOT / "examples").glob("*.miras")), *map(Path, extra or [])]
    for path, (stem, text) in ((p, v) for p in specs for v in variants(p)):
        if only and only not in (path.stem, stem) and not only.endswith(KERNEL_SUFFIX):
            continue
        module, ir = import_spec(text, str(path), out, "_check_sm90_token_" if stem.endswith("-token")
                                 else "_check_sm90_")
        names = kernel_names(module)
        module._kernel_names = names
        if only and only not in (path.stem, stem, *names):
            continue
        if not names:
            print(f"# {stem}: no triton kernels, skipped", file=sys.stderr)
            continue
        for n in names:  # keep the real kernels; the module's globals get the recorders
            setattr(module, f"_orig{n}", getattr(module, n))
        # the launch checks refuse CPU tensors; nothing here runs a kernel
        module._triton_usable = module._triton_step_usable = lambda *a: None
        for attr, cfg in (mlp_configs or {}).items():
            if hasattr(module, attr):
                setattr(module, attr, {**getattr(module, attr), **cfg})
        mlp = ir.memory.kind == "mlp"
        spec_chunk = module.CHUNK_SIZE
        chunks = chunk_list or ([spec_chunk] if mlp else sorted({spec_chunk, 64, 1}, reverse=True))
        seen = set()
        for K in [d for d in dims if d <= 128] if mlp else dims:
            for dtype, dname in [(torch.bfloat16, "bf16"), (torch.float32, "fp32")]:
                if dname not in dtypes:
                    continue
                for chunk in chunks:
                    if not mlp and hasattr(module, "_value_slices") and module._value_slices(K, K, chunk, dtype) is None:
                        print(f"# {stem} K={K} {dname} chunk={chunk}: refused by _fits (auto runs torch)",
                              file=sys.stderr)
                        continue
                    step_pos = 0
                    for kernel, args, kwargs in record(module, ir, K, dtype, chunk):
                        kname = kernel.__name__
                        if only and only in names and kname != only:
                            continue
                        sig, cexp, attrs, opts = bind(kernel, args, kwargs)
                        key = (kname, str(sig), str(cexp), str(attrs), str(opts))
                        config = f"K={K} {dname} chunk={chunk}"
                        if kname == "_step_kernel":
                            config += f" pos={step_pos}"
                            step_pos += 1
                        if key in seen:
                            continue
                        seen.add(key)
                        if "BV" in kernel.arg_names:  # the kernel's own tile (a column slice of a wide head)
                            config += " BK={} BV={}".format(*(cexp[(kernel.arg_names.index(n),)] for n in ("BK", "BV")))
                        if "LOWP" in kernel.arg_names:
                            config += f" LOWP={cexp[(kernel.arg_names.index('LOWP'),)]}"
                        JOBS.append({"layer": stem, "kernel": kname, "config": config,
                                     "src": ASTSource(kernel, sig, cexp, attrs), "options": opts.__dict__,
                                     "ws": f"{opts.num_warps}/{opts.num_stages}"})


def compile_job(i: int) -> dict:
    """Compile JOBS[i] for sm_90: ok / error, seconds, shared bytes, registers, spill bytes."""
    job = JOBS[i]
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report
    log = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(job["src"], target=TARGET, options=job["options"])
    except Exception as e:  # noqa: BLE001 - any compile error is a result
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        root = e  # a nested @triton.jit function's error is the innermost cause; its last line says what
        while root.__cause__ is not None:
            root = root.__cause__
        why = "" if root is e else " / " + next((ln for ln in str(root).splitlines()[::-1] if ln.strip()), "")
        return {"error": f"{type(e).__name__}: {first}{why}"[:240], "s": time.time() - t0}
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"error": None, "s": time.time() - t0, "shared": compiled.metadata.shared,
            "regs": int(regs.group(1)) if regs else None,
            "spill": (int(spill.group(1)), int(spill.group(2))) if spill else None}


def worker(i: int, results) -> None:
    os.setpgrp()  # its own process group: a timeout kills the compile together with its ptxas
    results.put((i, compile_job(i)))


def compile_all(jobs: int, timeout: float) -> list:
    """compile_job over JOBS in up to `jobs` forked processes; a compile past `timeout` s (0: none) is killed."""
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()
    results: list = [None] * len(JOBS)
    todo, running = list(range(len(JOBS))), {}  # running: index -> (process, start time)

    def finish(i: int, r: dict) -> None:
        results[i] = r
        job = JOBS[i]
        print(f"# [{sum(x is not None for x in results)}/{len(JOBS)}] {job['layer']} {job['kernel']} "
              f"{job['config']}: {r['error'] or 'ok'} ({r['s']:.1f} s)", file=sys.stderr, flush=True)

    while todo or running:
        while todo and len(running) < jobs:
            i = todo.pop(0)
            running[i] = (ctx.Process(target=worker, args=(i, done)), time.time())
            running[i][0].start()
        with contextlib.suppress(queue.Empty):
            i, r = done.get(timeout=1.0)
            if i in running:  # else it was already timed out
                running.pop(i)[0].join()
                finish(i, r)
        for i, (proc, start) in list(running.items()):
            if proc.exitcode not in (None, 0):  # crashed before reporting (a result comes with exit 0)
                del running[i]
                finish(i, {"error": f"compile process died (exit code {proc.exitcode})", "s": time.time() - start})
            elif timeout and time.time() - start > timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.join()
                del running[i]
                finish(i, {"error": f"timeout: killed after {timeout:.0f} s", "s": time.time() - start})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="one example (file stem) or one kernel name")
    parser.add_argument("--jobs", type=int, default=1, help="compiles at a time (processes)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per compile, then it fails (0: none)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="input dtypes to record (bf16, fp32)")
    parser.add_argument("--chunks", help="chunk sizes to record (default: the spec's, and 64 and 1 for "
                                         "matrix memories)")
    parser.add_argument("--dims", default="64,128",
                        help="head dims K = V to record (MLP memories: those up to 128); above 128 a matrix "
                             "memory's kernels see column slices")
    parser.add_argument("--mlp-fwd", help="JSON: keys of the MLP forward's launch setting to replace, e.g. "
                                          "'{\"num_warps\": 4}'")
    parser.add_argument("--mlp-bwd", help="JSON: the same for the MLP backward")
    parser.add_argument("--spec", action="append", default=[], help="a spec file to compile as well (repeatable)")
    args = parser.parse_args()
    t0 = time.time()
    mlp_configs = {attr: json.loads(text) for attr, text in
                   (("_MLP_FWD_CONFIG", args.mlp_fwd), ("_MLP_BWD_CONFIG", args.mlp_bwd)) if text}
    collect(args.only, [int(d) for d in args.dims.split(",")], args.dtypes.split(","),
            [int(c) for c in args.chunks.split(",")] if args.chunks else None, mlp_configs, args.spec)
    print(f"# {len(JOBS)} compilations recorded in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    results = compile_all(max(1, args.jobs), args.timeout)

    print("| layer | kernel | configuration | warps/stages | compile | s | shared (B) | regs | spill st/ld (B) |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    failed = over = spilled = 0
    for job, r in zip(JOBS, results):
        if r["error"]:
            failed += 1
            cells = [r["error"].replace("|", "\\|"), f"{r['s']:.1f}", "", "", ""]
        else:
            big = r["shared"] > SMEM_LIMIT
            over += big
            spilled += bool(r["spill"] and any(r["spill"]))
            spill = "/".join(map(str, r["spill"])) if r["spill"] else "?"
            cells = ["ok", f"{r['s']:.1f}", f"{r['shared']}{' **> limit**' if big else ''}", str(r["regs"]), spill]
        print("| " + " | ".join([job["layer"], job["kernel"], job["config"], job["ws"], *cells]) + " |")
    compile_s = sum(r["s"] for r in results)
    print(f"\n{len(JOBS)} kernels: {failed} failed to compile or timed out, {over} over {SMEM_LIMIT} B of "
          f"shared memory, {spilled} spill registers; {compile_s:.0f} s of compiling, {time.time() - t0:.0f} s wall "
          f"({args.jobs} jobs).")
    return 1 if failed or over else 0


if __name__ == "__main__":
    sys.exit(main())
