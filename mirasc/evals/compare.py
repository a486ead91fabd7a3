"""Compare specs under one budget, beside a softmax-attention baseline, and write a report folder.

    from mirasc.evals import compare
    compare(["examples/gated_deltanet.miras", "examples/retnet.miras"], task="mqar", out="reports/x")

Every model gets the same width, depth, seed, data order and step count. The baseline is the same LM
with softmax attention (RoPE) in every layer (`attn_every=1`): a Transformer++-style model (pre-norm,
RMSNorm, SwiGLU, rotary positions) of the same width. The report folder holds

    report.md           one table: model, parameters, tokens/s, final loss (or val bpb), accuracy
    loss.png            training loss curves overlaid (task: loss on answer tokens; bpb: val bits per byte)
    mqar_accuracy.png   MQAR accuracy against the number of key-value pairs, one panel per length
    passkey.png         passkey accuracy by context length (columns) and needle depth (rows), per model
    results/<name>.json every finished model's results (a rerun with the same settings skips it)
    runs/<name>/        every model's run folder (saved model, metrics.jsonl)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from .task_train import BASELINE, TASKS, TaskConfig, read_spec, train_task

LM_TASK = "bpb"
LM_OPTIONS = ("preset", "steps", "d_model", "layers", "heads", "head_dim", "seq_len", "batch_size", "seed",
              "lr", "data", "corpus_bytes", "threads")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _names(specs: list[str]) -> list[str]:
    """Model names: the spec files' stems, made unique; never the baseline's name."""
    names, seen = [], {BASELINE: 1}
    for spec in specs:
        stem = Path(read_spec(spec)[1]).stem
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names.append(stem if n == 0 else f"{stem}-{n + 1}")
    return names


def _lm_budget(overrides: dict) -> dict:
    """The training options the bpb task's models share (None: the preset's value)."""
    return {k: overrides.get(k) for k in LM_OPTIONS}


def _train_lm(spec: str | None, first_spec: str, name: str, run_dir: Path, overrides: dict) -> dict:
    """The bpb task: mirasc.train on the byte corpus; the baseline trains the first spec's config with
    attention in every layer (its memory block is not built)."""
    from mirasc.train import train
    from mirasc.train.trainer import read_metrics

    kwargs = {k: v for k, v in overrides.items() if k in LM_OPTIONS and v is not None}
    kwargs.setdefault("preset", "cpu")
    folder = train(spec or first_spec, out=str(run_dir), progress=False, attn_every=1 if spec is None else 0,
                   **kwargs)
    summary = json.loads((folder / "summary.json").read_text())
    rows = read_metrics(folder / "metrics.jsonl")
    return {"name": name, "spec_file": summary["spec_file"] if spec else "attention", "task": LM_TASK,
            "n_params": summary["n_params"], "steps": summary["steps"],
            "final_loss": next((r["loss"] for r in reversed(rows) if "loss" in r), None),
            "val_bpb": summary["val_bpb"], "unigram_entropy": summary["unigram_entropy"],
            "tokens": summary["tokens"], "tokens_per_s": summary["tokens_per_s"], "wall_s": summary["wall_s"],
            "accuracy": {}, "settings": [], "budget": _lm_budget(kwargs), "run": str(folder)}


def compare(specs: list[str], task: str = "mqar", out: str | os.PathLike | None = None, baseline: bool = True,
            progress: bool = True, **overrides) -> Path:
    """Train every spec (and the baseline) on `task` under the same settings, write the report folder and
    return it. task: "mqar" or "passkey" (train_task; overrides: TaskConfig fields) or "bpb" (mirasc.train
    on the byte corpus; overrides: preset, steps, d_model, layers, heads, head_dim, seq_len, batch_size,
    seed, lr, data, corpus_bytes). A model whose results/<name>.json exists with the same settings is not
    trained again."""
    if task not in (*TASKS, LM_TASK):
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join((*TASKS, LM_TASK))}")
    if not specs:
        raise ValueError("compare needs at least one spec")
    out = Path(out) if out else Path("reports") / f"compare-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / "results").mkdir(parents=True, exist_ok=True)
    models: list[tuple[str | None, str]] = list(zip(specs, _names(specs)))
    if baseline:
        models.append((None, BASELINE))
    if task in TASKS:
        cfg = TaskConfig(task=task, **{k: v for k, v in overrides.items() if v is not None}).resolved()
        budget = cfg.budget()
        steps_each = cfg.steps
    else:
        budget = _lm_budget({k: v for k, v in overrides.items() if v is not None} | {
            "preset": overrides.get("preset") or "cpu"})
        steps_each = 1
    from tqdm.auto import tqdm

    bar = tqdm(total=steps_each * len(models), disable=not progress, unit="step" if task in TASKS else "model",
               desc=f"compare {task}", dynamic_ncols=True, file=sys.stderr)
    wall0 = time.perf_counter()
    results = []
    for spec, name in models:
        path = out / "results" / f"{name}.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("budget") == budget and old.get("task") == task:
                results.append(old)
                bar.update(steps_each)
                continue
        bar.set_description(f"compare {task}: {name}")
        run_dir = out / "runs" / name
        if task in TASKS:
            done = [0]

            def step_hook(step, loss, done=done):
                bar.update(step - done[0])
                done[0] = step
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

            result = train_task(spec, task, out=run_dir, name=name, on_step=step_hook, progress=False,
                                **{k: v for k, v in dataclasses.asdict(cfg).items()
                                   if k not in ("task", "progress")} | ({"attn_every": 1} if spec is None else {}))
        else:
            result = _train_lm(spec, specs[0], name, run_dir, overrides)
            bar.update(1)
        tqdm.write(f"{name}: {result['n_params']:,} parameters, {result['tokens_per_s']:,.0f} tokens/s",
                   file=sys.stderr)
        _write_json(path, result)
        results.append(result)
    bar.close()
    write_report(out, results, task, budget, time.perf_counter() - wall0)
    return out


# ------------------------------------------------------------------------------------------------ report

def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def write_report(out: Path, results: list[dict], task: str, budget: dict, wall_s: float) -> Path:
    """report.md and the plots from the models' results."""
    plots = [plot_losses(out, results, task)]
    lines = [f"# Comparison: {task}", ""]
    lines.append("Settings shared by every model: " + ", ".join(f"{k}={v}" for k, v in budget.items()
                                                             if v is not None and not isinstance(v, list)))
    lines.append("")
    if task == "mqar":
        plots.append(plot_mqar(out, results))
        settings = results[0]["settings"]
        cols = [s["name"] for s in settings]
        head = ["model", "parameters", "tokens/s", "final loss", "mean acc"] + cols
        lines.append("Accuracy: share of queried values predicted (argmax), per sequence length T and number "
                     "of key-value pairs N.")
    elif task == "passkey":
        plots.append(plot_passkey(out, results))
        lens = sorted({s["seq_len"] for s in results[0]["settings"]})
        cols = [f"T={T}" for T in lens]
        head = ["model", "parameters", "tokens/s", "final loss", "mean acc"] + cols
        lines.append("Accuracy: share of haystacks whose every passkey digit is predicted (greedy exact match), "
                     "per context length T, averaged over needle depths (passkey.png shows each depth).")
    else:
        cols = []
        head = ["model", "parameters", "tokens/s", "final train loss", "val bpb"]
        lines.append("val bpb: validation bits per byte at the end of training (unigram entropy of the "
                     f"training bytes: {_fmt(results[0].get('unigram_entropy'))}).")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r["name"], f"{r['n_params']:,}", f"{r['tokens_per_s']:,.0f}", _fmt(r.get("final_loss"))]
        if task == "mqar":
            acc = r["accuracy"]
            row += [_fmt(_mean(acc.values()))] + [_fmt(acc.get(c)) for c in cols]
        elif task == "passkey":
            acc = r["accuracy"]
            row += [_fmt(_mean(acc.values()))]
            row += [_fmt(_mean(v for s, v in zip(r["settings"], acc.values()) if f"T={s['seq_len']}" == c))
                    for c in cols]
        else:
            row += [_fmt(r.get("val_bpb"))]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Training wall time per model (s): " + ", ".join(
        f"{r['name']} {r.get('wall_s', 0):.0f}" for r in results) + f"; this report's run: {wall_s:.0f} s "
        "(models whose results were already stored are not retrained).", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def plot_losses(out: Path, results: list[dict], task: str) -> Path:
    """loss.png: every model's training loss (EMA-smoothed, raw faint) against steps; for the bpb task
    the validation bits per byte against tokens."""
    from mirasc.train.trainer import read_metrics

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, r in enumerate(results):
        color = f"C{i}"
        rows = read_metrics(Path(r["run"]) / "metrics.jsonl")
        if task in TASKS:
            rows = [x for x in rows if "loss" in x]
            xs, ys = [x["step"] for x in rows], [x["loss"] for x in rows]
            if not ys:
                continue
            ax.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)
            ema, smooth = ys[0], []
            for y in ys:
                ema = 0.9 * ema + 0.1 * y
                smooth.append(ema)
            ax.plot(xs, smooth, color=color, label=f"{r['name']} ({r['n_params']:,} params)")
        else:
            val = [x for x in rows if "val_bpb" in x]
            ax.plot([x["tokens"] for x in val], [x["val_bpb"] for x in val], "o-", color=color,
                    label=f"{r['name']} ({r['n_params']:,} params)")
    if task in TASKS:
        ax.set_xlabel("training step")
        ax.set_ylabel("cross-entropy on answer tokens (nats)")
        ax.set_title(f"{task}: training loss (smoothed: EMA 0.9; faint: per step)")
    else:
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation bits per byte")
        ax.set_title("language modeling: validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out / "loss.png")


def plot_mqar(out: Path, results: list[dict]) -> Path:
    """mqar_accuracy.png: accuracy against the number of pairs (log2 axis), one panel per length."""
    plt = _plt()
    lens = sorted({s["seq_len"] for s in results[0]["settings"]})
    fig, axes = plt.subplots(1, len(lens), figsize=(5.5 * len(lens), 4.5), dpi=110, squeeze=False)
    for ax, T in zip(axes[0], lens):
        for i, r in enumerate(results):
            pts = [(s["pairs"], r["accuracy"][s["name"]]) for s in r["settings"] if s["seq_len"] == T]
            ax.plot([p for p, _ in pts], [a for _, a in pts], "o-", color=f"C{i}", label=r["name"])
        ax.set_xscale("log", base=2)
        ticks = sorted({s["pairs"] for s in results[0]["settings"] if s["seq_len"] == T})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("key-value pairs N")
        ax.set_ylabel("accuracy (queried values)")
        ax.set_title(f"MQAR, sequence length {T}")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out / "mqar_accuracy.png")


def plot_passkey(out: Path, results: list[dict]) -> Path:
    """passkey.png: one heatmap per model, needle depth (rows) by context length (columns)."""
    plt = _plt()
    lens = sorted({s["seq_len"] for s in results[0]["settings"]})
    depths = sorted({s["depth"] for s in results[0]["settings"]})
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(1.0 + 1.2 * len(lens) * n + 0.8, 1.2 + 0.55 * len(depths) + 1.2),
                             dpi=110, squeeze=False)
    image = None
    for ax, r in zip(axes[0], results):
        grid = [[float("nan")] * len(lens) for _ in depths]
        for s in r["settings"]:
            grid[depths.index(s["depth"])][lens.index(s["seq_len"])] = r["accuracy"][s["name"]]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for yi in range(len(depths)):
            for xi in range(len(lens)):
                v = grid[yi][xi]
                ax.text(xi, yi, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 else "white")
        ax.set_xticks(range(len(lens)), [str(T) for T in lens])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (share of the haystack before it)")
        ax.set_title(r["name"])
    trained = results[0].get("budget", {}).get("train_len")
    fig.suptitle("passkey retrieval accuracy" + (f" (trained at length {trained})" if trained else ""))
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.savefig(out / "passkey.tmp.png", bbox_inches="tight")
    plt.close(fig)
    os.replace(out / "passkey.tmp.png", out / "passkey.png")
    return out / "passkey.png"
