"""The demo's report: a table (markdown and plain text), a JSON record and a PNG plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from kdfast.demo.experiments import Outcome, Spec


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _cell(values: Sequence[float]) -> str:
    m, sd = _mean_sd(values)
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if len(values) > 1 else f"{100 * m:.1f}"


def rows(specs: Sequence[Spec], results: dict[str, list[Outcome]]) -> list[dict[str, str]]:
    """One dict per mode: the table's cells."""
    out = []
    for spec in specs:
        outs = results[spec.name]
        base = [o.baseline for o in outs]
        dist = [o.distilled for o in outs]
        diffs = [d - b for d, b in zip(dist, base)]
        dm, dsd = _mean_sd(diffs)
        wins = sum(d > 0 for d in diffs)
        row = {"mode": spec.name, "student learns from": spec.learns_from, "test set": spec.test_set,
               "baseline": spec.baseline, "baseline acc %": _cell(base), "kdfast acc %": _cell(dist),
               "gain (points)": f"{100 * dm:+.1f}" + (f" ± {100 * dsd:.1f}" if len(diffs) > 1 else ""),
               "seeds won": f"{wins}/{len(diffs)}"}
        plain = outs[0].extra.get("reference_distilled")
        if plain is not None:
            kd = outs[0].distilled
            row["plain PyTorch losses, 1st seed"] = f"{100 * plain:.1f} (kdfast {100 * kd:.1f})"
        out.append(row)
    return out


def markdown(table: list[dict[str, str]]) -> str:
    cols = list(dict.fromkeys(c for r in table for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(r.get(c, "-") for c in cols) + " |" for r in table]
    return "\n".join(lines)


def plain(table: list[dict[str, str]], columns: Sequence[str]) -> str:
    widths = {c: max(len(c), *(len(r.get(c, "-")) for r in table)) for c in columns}
    head = "  ".join(c.ljust(widths[c]) for c in columns)
    body = ["  ".join(r.get(c, "-").ljust(widths[c]) for c in columns) for r in table]
    return "\n".join([head, "  ".join("-" * widths[c] for c in columns), *body])


def save(out: Path, specs: Sequence[Spec], results: dict[str, list[Outcome]], meta: dict) -> list[Path]:
    """Write ``results.md``, ``results.json`` and ``demo.png`` (if matplotlib imports) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    table = rows(specs, results)
    written = []
    (out / "results.md").write_text(markdown(table) + "\n")
    written.append(out / "results.md")
    record = {"meta": meta, "results": {name: [o.__dict__ for o in outs] for name, outs in results.items()}}
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    written.append(out / "results.json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    names = [s.name for s in specs]
    base = [_mean_sd([o.baseline for o in results[n]]) for n in names]
    dist = [_mean_sd([o.distilled for o in results[n]]) for n in names]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [100 * m for m, _ in base], 0.4, xerr=[100 * s for _, s in base],
            label="no distillation (same student, same budget)", color="#b0b0b0")
    ax.barh([i - 0.2 for i in y], [100 * m for m, _ in dist], 0.4, xerr=[100 * s for _, s in dist],
            label="kdfast distillation", color="#2a7ab9")
    ax.set_yticks(list(y), [f"{s.name}\n({s.test_set})" for s in specs], fontsize=8)
    ax.invert_yaxis()
    lo = min(100 * m for m, _ in base + dist)
    ax.set_xlim(max(0.0, lo - 10), 100)
    ax.set_xlabel(f"test accuracy (%), mean ± sd over {meta['seeds']} seeds")
    ax.set_title("kdfast demo: students with and without distillation (real digit images, CPU)")
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out / "demo.png", dpi=110)
    plt.close(fig)
    written.append(out / "demo.png")
    return written
