"""`mirasc compile | check | explain | bench`: the command line. Spec errors print as file:line:col, never a traceback."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class CliError(Exception):
    """A failure outside any spec text (a file that cannot be read or written): `mirasc: ...`, exit 1."""


def _read(path: str) -> str:
    """The spec text at `path`; an unreadable file is a CliError, bytes that are not UTF-8 a SpecError."""
    from .frontend import read_spec_text

    try:
        return read_spec_text(path)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None


def cmd_compile(args: argparse.Namespace) -> int:
    from .compiler import _write_atomic, compile_spec

    for path in args.specs:
        start = time.perf_counter()
        compiled = compile_spec(_read(path), path)
        out = Path(args.output) / f"{compiled.stem}.py"
        try:
            _write_atomic(out, compiled.source)
        except OSError as exc:
            raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None
        print(f"{path} -> {out}  ({compiled.ir.name}, {compiled.ir.bias.klass} bias, "
              f"{time.perf_counter() - start:.2f} s)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .frontend import load_spec
    from .stability import analyse

    for path in args.specs:
        spec = load_spec(_read(path), path)
        for warning in analyse(spec):  # the first update's stability at the gates' inits; exit status stays 0
            print(warning, file=sys.stderr)
        print(f"{path}: ok ({spec.name})")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .frontend import load_spec
    from .symbolic.derive import derive
    from .symbolic.explain import explain

    for path in args.specs:
        ir = derive(load_spec(_read(path), path))
        if not args.plan:
            print(explain(ir))
            continue
        from . import __version__
        from .codegen.emit import plans
        from .codegen.plan import format_plan

        p = plans(ir, __version__)
        print(f"# {path}: the plans the code generator renders\n")
        for name, plan in (("module (m)", p.module), ("matrix-memory kernels (linear)", p.linear),
                           ("MLP-memory kernels (mlp_plan)", p.mlp), ("MLP map read-out kernels (mlp_map)", p.mlp_map),
                           ("fused decode step (step)", p.step)):
            if plan is not None:
                print(format_plan(plan, name=name))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    for path in args.specs:
        _read(path)
        run_bench(path, args.batch, args.seq, args.dtype, args.device, args.reps)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.cli import run

    return run(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from .lm.generate import find_model_dir, generate_bytes, load_model

    if args.max_new_tokens < 1:
        raise SystemExit("mirasc: --max-new-tokens must be at least 1")
    path = find_model_dir(args.run_dir)
    model = load_model(path, args.device)
    temperature = 0.0 if args.greedy else args.temperature
    text, timing = generate_bytes(model, args.prompt.encode("utf-8"), args.max_new_tokens, temperature, args.seed)
    print(args.prompt + text.decode("utf-8", errors="replace"))
    print(f"[{path}: {timing['tokens']} tokens, prefill {timing['prefill_ms']:.1f} ms, "
          f"{timing['ms_per_token']:.2f} ms/token on {next(model.parameters()).device}]", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evals.cli import cmd_eval as run

    return run(args)


def cmd_compare(args: argparse.Namespace) -> int:
    from .evals.cli import cmd_compare as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mirasc", description="Compile .miras specs into Miras layers.")
    parser.add_argument("--version", action="version", version=f"mirasc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="write one Python module per spec")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument("-o", "--output", default=".", help="output folder (default: .)")
    p.set_defaults(run=cmd_compile)
    p = sub.add_parser("check", help="parse and check specs, report errors")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.set_defaults(run=cmd_check)
    p = sub.add_parser("explain", help="print the derived update rule (--plan: the code generator's plans)")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument("--plan", action="store_true",
                   help="print the plans (every variant and launch decision) instead of the rule")
    p.set_defaults(run=cmd_explain)
    p = sub.add_parser("bench", help="time the layer's memory on every backend beside softmax attention")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (median reported)")
    p.set_defaults(run=cmd_bench)
    p = sub.add_parser("train", help="train a causal LM around the spec's layer (docs/training.md)")
    from .train.cli import add_arguments as add_train_arguments

    add_train_arguments(p)
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("generate", help="continue a prompt with a trained model (byte level), print ms/token")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a saved model folder, or a run folder (its latest checkpoint)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding")
    mode.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.set_defaults(run=cmd_generate)
    from .evals.cli import add_compare_arguments, add_eval_arguments

    p = sub.add_parser("eval", help="evaluate a trained run: bpb, bpb by position, chunk sizes, MQAR, passkey "
                                    "(docs/evals.md)")
    add_eval_arguments(p)
    p.set_defaults(run=cmd_eval)
    p = sub.add_parser("compare", help="train specs and a softmax-attention baseline under one budget; "
                                       "write a report folder (docs/evals.md)")
    add_compare_arguments(p)
    p.set_defaults(run=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure prints one located line (or `mirasc: ...`) and returns 1.

    A failure that is a bug in mirasc prints `mirasc: internal error: ...` instead of a traceback;
    MIRASC_TRACEBACK=1 lets the exception through for debugging.
    """
    import os

    from .frontend.errors import SpecError
    from .symbolic.objectives import DeriveError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SpecError as err:
        print(err, file=sys.stderr)
    except CliError as err:
        print(f"mirasc: {err}", file=sys.stderr)
    except DeriveError as err:  # the checker should refuse what derive cannot do; still a located line
        print(f"{err.loc}: error: {err.message}" if err.loc.line else f"mirasc: {err.message}", file=sys.stderr)
    except Exception as err:  # the promise is one line, never a traceback
        if os.environ.get("MIRASC_TRACEBACK"):
            raise
        text = " ".join(str(err).split())[:300]
        print(f"mirasc: internal error: {type(err).__name__}: {text}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
