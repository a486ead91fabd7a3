"""`mirasc eval RUN --task ...` and `mirasc compare SPEC... --task ...`: options and commands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EVAL_TASKS = ("bpb", "positions", "chunks", "mqar", "passkey")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a run folder (mirasc train, or a task run of mirasc compare) "
                                              "or a saved model folder")
    p.add_argument("--task", choices=EVAL_TASKS, default="bpb",
                   help="bpb: validation bits per byte; positions: bpb by position in the context; chunks: "
                        "bpb at other chunk sizes; mqar / passkey: recall accuracy (default: bpb)")
    p.add_argument("--seq-len", type=int, default=None, help="row length for bpb/positions/chunks "
                                                              "(default: the training length)")
    p.add_argument("--rows", type=int, default=64, help="validation rows read (bpb, positions, chunks)")
    p.add_argument("--chunks", type=_ints, default=None, help="chunk sizes, e.g. 1,4,16,64 (chunks)")
    p.add_argument("--lens", type=_ints, default=None, help="sequence lengths, e.g. 128,256 (mqar, passkey)")
    p.add_argument("--pairs", type=_ints, default=None, help="key-value pair counts, e.g. 2,4,8 (mqar)")
    p.add_argument("--depths", type=_floats, default=None, help="needle depths, e.g. 0,0.5,1 (passkey)")
    p.add_argument("--samples", type=int, default=None, help="sequences per setting (mqar, passkey)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON")


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument("--task", choices=("mqar", "passkey", "bpb"), default="mqar",
                   help="mqar (default), passkey, or bpb (language modeling on the byte corpus)")
    p.add_argument("--out", default=None, help="report folder (default: reports/compare-<task>-<time>); "
                                               "rerunning with the same folder resumes")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="leave out the softmax-attention baseline")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    for opt, typ, text in [
        ("--steps", int, "training steps per model (mqar 600, passkey 600; bpb: the preset's)"),
        ("--d-model", int, "model width (64; bpb: the preset's)"),
        ("--layers", int, "layers (2)"),
        ("--heads", int, "heads of the memory and attention layers (2)"),
        ("--head-dim", int, "key and value dim per memory head (32)"),
        ("--batch-size", int, "sequences per step (32)"),
        ("--lr", float, "peak learning rate"),
        ("--seed", int, "seed of the weights and the data order (0)"),
        ("--threads", int, "CPU threads (1)"),
        ("--train-len", int, "training sequence length (mqar 64, passkey 128)"),
        ("--train-pairs", int, "mqar: up to this many pairs per training sequence (8)"),
        ("--eval-lens", _ints, "evaluation lengths, e.g. 64,128 (mqar: 1x, 2x; passkey: 1, 2, 4, 8x train)"),
        ("--eval-pairs", _ints, "mqar: pair counts scored (1,2,4,8,16,32 where they fit)"),
        ("--eval-depths", _floats, "passkey: needle depths scored (0,0.25,0.5,0.75,1)"),
        ("--eval-samples", int, "sequences per scored setting (64)"),
        ("--filler", str, "passkey haystack: random (letters) or text (standard-library corpus)"),
        ("--digits", int, "passkey digits (5)"),
        ("--preset", str, "bpb: the mirasc train preset (cpu)"),
        ("--seq-len", int, "bpb: training row length"),
    ]:
        p.add_argument(opt, type=typ, default=None, help=text)


def _print_table(head: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in [head, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def cmd_eval(args: argparse.Namespace) -> int:
    from . import lm_eval

    run = Path(args.run_dir)
    if not run.exists():
        raise SystemExit(f"mirasc eval: no such folder: {run}")
    if args.task == "bpb":
        result = lm_eval.bpb(run, args.seq_len, args.rows)
        print(f"{run}: validation {result['bpb']:.4f} bits per byte ({result['tokens']:,} tokens, "
              f"rows of {result['seq_len']})")
    elif args.task == "positions":
        result = lm_eval.bpb_by_position(run, args.seq_len, args.rows)
        print(f"{run}: {result['bpb']:.4f} bits per byte over rows of {result['seq_len']} "
              f"(trained on {result['train_len']}); by position in the document:")
        _print_table(["positions", "bpb", "tokens"],
                     [[f"{b['lo']}-{b['hi'] - 1}", f"{b['bpb']:.4f}", f"{b['tokens']:,}"] for b in result["buckets"]])
    elif args.task == "chunks":
        result = lm_eval.chunk_consistency(run, args.chunks, args.seq_len, args.rows)
        print(f"{run}: bits per byte by chunk size (trained with chunk {result['train_chunk']})")
        _print_table(["chunk", "bpb", "change"], [[r["chunk"], f"{r['bpb']:.4f}", f"{r['delta']:+.4f}"]
                                                  for r in result["results"]])
    else:
        result = _eval_task(run, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _eval_task(run: Path, args: argparse.Namespace) -> dict:
    import dataclasses

    from .lm_eval import load_run_model
    from .task_train import TaskConfig, evaluate_task, load_task_config

    if (run / "task.json").exists():
        cfg = load_task_config(run)
        if cfg.task != args.task:
            print(f"note: {run} was trained on {cfg.task}, scored here on {args.task}", file=sys.stderr)
        cfg = dataclasses.replace(cfg, task=args.task)
    else:
        cfg = TaskConfig(task=args.task)
        print(f"note: {run} has no task.json (it was not trained on {args.task}); default settings",
              file=sys.stderr)
    if args.task == "mqar" and cfg.train_len and not 4 * cfg.train_pairs <= cfg.train_len:
        cfg = dataclasses.replace(cfg, train_pairs=cfg.train_len // 4)
    changes = {"eval_lens": args.lens, "eval_pairs": args.pairs, "eval_depths": args.depths,
               "eval_samples": args.samples}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    if args.task == "passkey" and args.lens is None and cfg.train_len is None:
        cfg = dataclasses.replace(cfg, eval_lens=None)
    cfg = cfg.resolved()
    model = load_run_model(run)
    acc = evaluate_task(model, cfg)
    print(f"{run}: {args.task} accuracy ({cfg.eval_samples} sequences per setting)")
    _print_table(["setting", "accuracy"], [[k, f"{v:.3f}"] for k, v in acc.items()])
    return {"task": args.task, "accuracy": acc}


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    keys = ("steps", "d_model", "layers", "heads", "head_dim", "batch_size", "lr", "seed", "threads",
            "train_len", "train_pairs", "eval_lens", "eval_pairs", "eval_depths", "eval_samples", "filler",
            "digits", "preset", "seq_len")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    task_only = {"train_len", "train_pairs", "eval_lens", "eval_pairs", "eval_depths", "eval_samples", "filler",
                 "digits", "batch_size", "threads"}
    if args.task == "bpb":
        bad = sorted(set(overrides) & (task_only - {"batch_size", "threads"}))
    else:
        bad = sorted(set(overrides) & {"preset", "seq_len"})
    if bad:
        raise SystemExit(f"mirasc compare: --task {args.task} takes no {', '.join(bad)}")
    out = compare(args.specs, args.task, args.out, args.baseline, args.progress, **overrides)
    print(f"report: {out / 'report.md'}")
    return 0
