"""``kdfast distill --config``: every example config runs, overrides, validation messages,
resume, a real short run, the command line in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kdfast import __main__ as cli
from kdfast.train import config as C

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
EXAMPLES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
QUICK = ["--set", "train.max_steps=2", "--set", "train.progress=false", "--set", "data.eval_batch_size=1000"]

pytest.importorskip("yaml", reason="the example configs are YAML (pip install 'kdfast[yaml]')")
pytestmark = pytest.mark.filterwarnings("ignore:kdfast. the compiled extension")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def distill(*args: str) -> int:
    return cli.main(["distill", *[str(a) for a in args]])


def example(name: str) -> dict:
    return C.load_config(CONFIGS / f"{name}.yaml")


@pytest.fixture(scope="module")
def baseline_student(tmp_path_factory) -> Path:
    """supervised.yaml's trained student: the teacher of self.yaml."""
    out = tmp_path_factory.mktemp("runs") / "supervised"
    assert distill("--config", CONFIGS / "supervised.yaml", *QUICK, "--set", f"output.dir={out}") == 0
    return out / "student.pt"


# -- the example configs ----------------------------------------------------------------------------


def test_one_example_per_demo_mode():
    from kdfast.demo.experiments import SPECS

    assert {s.name for s in SPECS} <= set(EXAMPLES)
    assert "supervised" in EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_config_runs_two_steps(name, tmp_path, baseline_student, capsys):
    out = tmp_path / name
    extra = ["--set", f"teacher.checkpoint={baseline_student}"] if name == "self" else []
    assert distill("--config", CONFIGS / f"{name}.yaml", *QUICK, *extra, "--set", f"output.dir={out}") == 0
    summary = json.loads((out / "metrics.json").read_text())
    resolved = json.loads((out / "config.json").read_text())
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert text.startswith("# ") and "kdfast distill --config" in text       # the README-style header
    assert resolved["train"]["max_steps"] == 2
    assert summary["mode"] == resolved["mode"]["name"] == example(name)["mode"]["name"]
    if name == "lifelong":
        assert set(summary["metrics"]) >= {"accuracy/mnist", "accuracy/permuted", "average_accuracy"}
        assert (out / "checkpoints" / "task1" / "last.pt").is_file()
        assert summary["steps"] == 4                                           # 2 per task
    else:
        assert summary["steps"] == 2
        assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0
        assert (out / "checkpoints" / "last.pt").is_file()
        log = [json.loads(line) for line in (out / "checkpoints" / "log.jsonl").read_text().splitlines()]
        assert log[0]["step"] == 1
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)
    state = torch.load(out / "student.pt", weights_only=True)
    student = C.build_model(resolved["student"] | {"checkpoint": None}, "student")
    if name == "lifelong":                      # the heads are added while learning the tasks
        student.add_head(10)
        student.add_head(10)
    student.load_state_dict(state)
    printed = capsys.readouterr().out
    assert "steps" in printed and "eval/" in printed                          # the summary table


def _demo_loader_batch(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    return next(iter(loader))


def test_soft_example_reproduces_the_demo_set_up():
    from kdfast.demo.data import load_mnist5k
    from kdfast.demo.models import ConvStudent

    run = C.build(example("soft"))
    mode = run.mode
    assert (mode.name, mode.temperature, mode.alpha) == ("soft", 4.0, 0.5)
    assert run.distiller.lr == 2e-3 and run.distiller.max_steps == 600 and run.distiller.epochs == 10
    # the demo's transfer set: 500 labelled then 3,500 unlabelled images of load_mnist5k(seed=0)
    x, y = load_mnist5k(seed=0)
    transfer_y = torch.cat([y[1000:1500], torch.full((3500,), -100)])
    xb, yb = next(iter(run.train_data))
    ex, ey = _demo_loader_batch(x[1000:5000], transfer_y, 0)
    assert torch.equal(xb, ex) and torch.equal(yb, ey)
    assert len(run.train_data.dataset) == 4000 and len(run.eval_data.dataset) == 1000
    xt, yt = next(iter(run.eval_data))
    assert torch.equal(xt, x[:500]) and torch.equal(yt, y[:500])
    torch.manual_seed(0)
    demo_student = ConvStudent()
    assert all(torch.equal(a, b) for a, b in zip(demo_student.state_dict().values(),
                                                  run.student.state_dict().values()))


def test_domain_example_pairs_source_and_target_like_the_demo():
    from kdfast.demo.data import load_mnist5k, load_sklearn_digits

    run = C.build(example("cross_domain"))
    batch = next(iter(run.train_data))
    x, y = load_mnist5k(seed=0)
    sx, sy = _demo_loader_batch(x[1000:1500], y[1000:1500], 0)
    assert torch.equal(batch["source"][0], sx) and torch.equal(batch["source"][1], sy)
    dx, dy = load_sklearn_digits()
    order = torch.randperm(len(dy), generator=torch.Generator().manual_seed(0))
    dx, dy = dx[order], dy[order]
    tx, _ = _demo_loader_batch(dx[797:], torch.full((1000,), -100), 1)
    assert torch.equal(batch["target"][0], tx) and bool((batch["target"][1] == -100).all())
    ex, ey = next(iter(run.eval_data))
    assert torch.equal(ex, dx[:500]) and torch.equal(ey, dy[:500])
    assert len(run.train_data) == 1000 // 64


# -- overrides and printing ----------------------------------------------------------------------


def test_apply_overrides_nested_lists_and_values():
    cfg = {"mode": {"name": "soft"}, "teachers": [{"model": "a"}, {"model": "b"}], "teacher": "mnist_cnn"}
    out = C.apply_overrides(cfg, ["mode.temperature=2", "train.max_steps=5", "data.test=[0, 200]",
                                  "teachers.1.model=usps_cnn", "train.grad_clip=null", "mode.divergence=jsd",
                                  "train.progress=false", "optimizer.lr=1e-3", "teacher.seed=3"])
    assert out["mode"] == {"name": "soft", "temperature": 2, "divergence": "jsd"}
    assert out["train"] == {"max_steps": 5, "grad_clip": None, "progress": False}
    assert out["data"]["test"] == [0, 200] and out["optimizer"]["lr"] == 1e-3
    assert out["teachers"][1]["model"] == "usps_cnn" and out["teacher"] == {"model": "mnist_cnn", "seed": 3}
    assert cfg["mode"] == {"name": "soft"}                  # the input is not modified
    for bad, key in (("mode", "--set"), ("mode.name.x=1", "mode.name"), ("teachers.7.model=x", "teachers.7")):
        with pytest.raises(C.ConfigError, match=key):
            C.apply_overrides(cfg, [bad])


def test_set_reaches_the_mode_and_print_config(capsys):
    assert distill("--config", CONFIGS / "soft.yaml", "--set", "mode.temperature=2",
                   "--set", "optimizer.name=sgd", "--print-config") == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["mode"]["temperature"] == 2 and printed["mode"]["divergence"] == "forward_kl"
    assert printed["optimizer"] == {"name": "sgd", "lr": 0.002, "weight_decay": 0.0, "options": {}}
    run = C.build(C.apply_overrides(example("soft"), ["mode.temperature=2"]))
    assert run.mode.temperature == 2.0


def test_every_distiller_option_is_reachable(tmp_path):
    cfg = C.apply_overrides(example("soft"), [
        "optimizer.name=sgd", "optimizer.weight_decay=0.01", "schedule.name=cosine",
        "schedule.warmup_steps=3",
        "train.epochs=2", "train.max_steps=7", "train.grad_accum=2", "train.grad_clip=1.5", "train.amp=null",
        "train.device=cpu", "train.num_classes=10", "train.eval_every=4", "train.save_every=5",
        "train.log_every=3", "train.progress=false", f"output.dir={tmp_path}"])
    d = C.build(cfg).distiller
    assert (d.weight_decay, d.warmup_steps, d.epochs, d.max_steps, d.grad_accum, d.grad_clip) == \
        (0.01, 3, 2, 7, 2, 1.5)
    assert (d.amp_dtype, d.device, d.num_classes, d.eval_every, d.save_every, d.log_every, d.progress) == \
        (None, torch.device("cpu"), 10, 4, 5, 3, False)
    assert d.checkpoint_dir == tmp_path / "checkpoints"
    assert d._optimizer_spec == "sgd" and d._scheduler_spec == "cosine"


def test_optimizer_by_import_path(tmp_path):
    cfg = C.apply_overrides(example("supervised"), [
        "optimizer.name=torch.optim:SGD", 'optimizer.options={"momentum": 0.5}', "optimizer.lr=0.01"])
    run = C.build(cfg)
    run.distiller.prepare(run.train_data)
    opt = run.distiller.optimizer
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["lr"] == 0.01


def test_list_and_missing_config(capsys):
    assert distill("--list") == 0
    text = capsys.readouterr().out
    assert "conv_student" in text and "mnist5k" in text and "temperature=4.0" in text
    assert distill() == 2
    assert "--config is required" in capsys.readouterr().err


# -- bad configs -------------------------------------------------------------------------------------

BAD = [
    # unknown keys at every level, with did-you-mean and the allowed keys
    (["traim.epochs=2"], "traim: unknown key (did you mean 'train'?); allowed: data, mode"),
    (["student.optionz={}"], "student.optionz: unknown key (did you mean 'options'?)"),
    (["student.options.c3=4"], "student.options.c3: unknown option of model 'conv_student'; allowed: c1, c2"),
    (["mode.tempreature=2"], "mode.tempreature: unknown option of mode 'soft' (did you mean 'temperature'?); "
                             "allowed: alpha, backend, beta"),
    (["data.batchsize=3"], "data.batchsize: unknown key (did you mean 'batch_size'?)"),
    (["optimizer.learning_rate=3"], "optimizer.learning_rate: unknown key; allowed: lr, name, options, "
                                    "weight_decay"),
    (["schedule.warmup=3"], "schedule.warmup: unknown key (did you mean 'warmup_steps'?)"),
    (["train.max_step=3"], "train.max_step: unknown key (did you mean 'max_steps'?)"),
    (["output.directory=x"], "output.directory: unknown key"),
    (["data.options.box=4"], "data.options.box: unknown option of dataset 'mnist5k'"),
    # bad types
    (["train.epochs=two"], "train.epochs: must be an int >= 1 or null, got 'two'"),
    (["train.progress=3"], "train.progress: must be true or false, got 3"),
    (["mode.temperature=hot"], "mode.temperature: must be a number, got 'hot'"),
    (["data.test=5"], "data.test: must be [start, stop]"),
    (["mode=soft"], "mode: must be a mapping"),
    # bad ranges
    (["train.epochs=0"], "train.epochs: must be an int >= 1 or null, got 0"),
    (["optimizer.lr=-1"], "optimizer.lr: must be a number > 0, got -1"),
    (["mode.alpha=2"], "mode.alpha: must be finite and in [0.0, 1.0], got 2.0"),
    (["data.labelled=[0, 9000]"], "data.labelled: rows [0, 9000] go past the 5000 rows of 'mnist5k'"),
    (["student.options.c1=0"], "student.options: ConvStudent: c1 must be a positive int, got 0"),
    # bad choices
    (["mode.name=sfot"], "mode.name: must be one of supervised, soft"),
    (["mode.divergence=kl"], "mode.divergence: must be one of ('forward_kl', 'reverse_kl', 'jsd'), got 'kl'"),
    (["schedule.name=cos"], "schedule.name: must be one of constant, cosine, linear, got 'cos' (did you mean "
                            "'cosine'?)"),
    (["train.amp=fp8"], "train.amp: must be one of auto, bf16, fp16, null, got 'fp8'"),
    (["student.model=convstudent"], "student.model: must be one of conv_student"),
    (["data.dataset=mnist"], "data.dataset: must be one of mnist5k, digits or an import path"),
    # bad import paths, missing files, inconsistent sections
    (["student.model=kdfast_nowhere.models:Net"],
     "student.model: cannot import module 'kdfast_nowhere.models'"),
    (["teacher.model=kdfast.demo.models:Nope"],
     "teacher.model: module 'kdfast.demo.models' has no attribute"),
    (["data.dataset=kdfast.demo.data:nothing_here"],
     "data.dataset: module 'kdfast.demo.data' has no attribute"),
    (["teacher.checkpoint=/nonexistent/t.pt"], "teacher.checkpoint: no such file '/nonexistent/t.pt'"),
    (["mode.name=multi_teacher"], "teachers: the 'multi_teacher' mode needs a list of at least two teachers"),
    (['mode={"name": "consistency"}'], "teacher: the 'consistency' mode uses no teacher"),
    (['mode={"name": "lifelong"}', "teacher=null"], "data.tasks: the 'lifelong' mode learns a sequence"),
    (['mode={"name": "offline"}', "data.cache.storage=top"], "data.cache.storage: must be one of topk"),
    (["data.cache.k=4"], "data.cache: only the 'offline' mode reads a teacher cache, not 'soft'"),
    (['data.target={"dataset": "digits", "unlabelled": [0, 100]}'], "data.target: only the domain modes"),
    (["mode.name=cross_domain"],
     "data.target: the 'cross_domain' mode trains on a source and a target domain"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_names_the_key(overrides, message, capsys, tmp_path):
    args = [a for o in overrides for a in ("--set", o)]
    assert distill("--config", CONFIGS / "soft.yaml", *args, "--set", f"output.dir={tmp_path}",
                   "--dry-run") == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "checkpoints").exists()


def test_bad_files(tmp_path, capsys):
    assert distill("--config", tmp_path / "missing.yaml") == 2
    assert "--config: no such file" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"mode": ')
    assert distill("--config", tmp_path / "broken.json") == 2
    assert "cannot parse" in capsys.readouterr().err
    (tmp_path / "run.ini").write_text("[x]")
    assert distill("--config", tmp_path / "run.ini") == 2
    assert "unknown file type '.ini'" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert distill("--config", tmp_path / "list.json") == 2
    assert "the top level" in capsys.readouterr().err
    assert distill("--config", CONFIGS / "lifelong.yaml", "--resume", "--dry-run") == 2
    assert "train.resume: the 'lifelong' mode does not resume" in capsys.readouterr().err
    with pytest.raises(C.ConfigError, match="student: missing"):
        C.resolve({"mode": {"name": "supervised"}, "data": {"dataset": "digits"}})
    with pytest.raises(C.ConfigError, match=r"mode\.name: missing; allowed: supervised, soft"):
        C.resolve({"mode": {}})


def test_yaml_missing_says_how_to_install_but_json_and_toml_work(tmp_path, monkeypatch, capsys):
    cfg = C.resolve(example("supervised"))
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    toml = "seed = 0\n[student]\nmodel = 'linear'\n[student.options]\nin_features = 784\n" \
           "[data]\ndataset = 'mnist5k'\ntest = [0, 100]\nlabelled = [100, 300]\n" \
           "[mode]\nname = 'supervised'\n"
    (tmp_path / "run.toml").write_text(toml)
    monkeypatch.setitem(sys.modules, "yaml", None)           # import yaml -> ImportError
    assert distill("--config", CONFIGS / "soft.yaml", "--dry-run") == 2
    assert "pip install 'kdfast[yaml]'" in capsys.readouterr().err
    assert distill("--config", tmp_path / "run.json", "--print-config") == 0
    assert json.loads(capsys.readouterr().out) == cfg          # JSON when PyYAML is missing
    assert C.resolve(C.load_config(tmp_path / "run.toml"))["student"]["options"] == {"in_features": 784}
    assert C.parse_value("cosine") == "cosine" and C.parse_value("[1, 2]") == [1, 2]
    assert C.parse_value("True") is True and C.parse_value("none") is None


# -- runs -------------------------------------------------------------------------------------------

SMALL = ["--set", "data.unlabelled=[1500, 2000]", "--set", "data.test=[0, 200]",
         "--set", "train.progress=false", "--set", "train.log_every=1", "--set", "data.batch_size=32"]


def test_resume_continues_to_the_same_student(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ["--config", CONFIGS / "soft.yaml", *SMALL]
    assert distill(*args, "--set", "train.max_steps=4", "--set", f"output.dir={straight}") == 0
    assert distill(*args, "--set", "train.max_steps=2", "--set", f"output.dir={split}") == 0
    assert distill(*args, "--set", "train.max_steps=4", "--set", f"output.dir={split}") == 2
    assert "already holds a run" in capsys.readouterr().err               # no silent restart
    assert distill(*args, "--set", "train.max_steps=4", "--set", "mode.temperature=2",
                   "--set", f"output.dir={split}", "--resume") == 2
    err = capsys.readouterr().err
    assert "differs from the run" in err and "mode.temperature" in err
    assert distill(*args, "--set", "train.max_steps=4", "--set", f"output.dir={split}", "--resume") == 0
    assert json.loads((split / "metrics.json").read_text())["steps"] == 4
    a = torch.load(straight / "student.pt", weights_only=True)
    b = torch.load(split / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)                        # same bits as one run
    log = [json.loads(x) for x in (split / "checkpoints" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert distill(*args, "--set", "train.max_steps=4", "--set", f"output.dir={split}",
                   "--set", "output.overwrite=true") == 0                   # starts again
    log = [json.loads(x) for x in (split / "checkpoints" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_resume_refuses_a_changed_set_up(tmp_path, capsys):
    args = ["--config", CONFIGS / "supervised.yaml", *SMALL, "--set", f"output.dir={tmp_path}"]
    assert distill(*args, "--set", "train.max_steps=1") == 0
    assert distill(*args, "--set", "train.max_steps=2", "--set", "optimizer.lr=0.1", "--resume") == 2
    assert "--resume: the configuration differs" in capsys.readouterr().err


def test_loss_goes_down_on_a_short_real_run(tmp_path):
    summary = C.run(C.apply_overrides(example("soft"), [
        "train.max_steps=60", "train.log_every=5", "train.progress=false", f"output.dir={tmp_path}",
        "data.test=[0, 500]"]), log=lambda _line: None)
    log = [json.loads(x) for x in (tmp_path / "checkpoints" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert summary["steps"] == 60 and len(losses) == 13
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary["metrics"]["accuracy"] > 0.5                 # chance is 0.1


def test_subprocess_with_import_paths(tmp_path, monkeypatch, capsys):
    (tmp_path / "tinydigits.py").write_text(
        "import torch\nfrom sklearn.datasets import load_digits\n\n\n"
        "def load(scale=16.0):\n    d = load_digits()\n"
        "    return torch.tensor(d.data, dtype=torch.float32) / scale, torch.tensor(d.target)\n")
    cfg = {"seed": 1,
           "student": {"model": "torch.nn:Linear", "options": {"in_features": 64, "out_features": 10}},
           "data": {"dataset": "tinydigits:load", "test": [0, 300], "labelled": [300, 1797],
                    "batch_size": 32},
           "mode": {"name": "supervised"}, "optimizer": {"lr": 0.05},
           "train": {"max_steps": 30, "log_every": 10}, "output": {"dir": "out"}}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "kdfast", "distill", "--config", "run.json",
                           "--set", "train.progress=false"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "eval/accuracy" in proc.stdout
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["steps"] == 30 and summary["metrics"]["accuracy"] > 0.7     # a linear model on digits
    assert summary["last_loss"] < summary["first_loss"]
    monkeypatch.chdir(tmp_path)                    # the same file in-process: a bad option of the import
    assert distill("--config", "run.json", "--set", "student.options.in_feature=64") == 2
    assert "student.options.in_feature: unknown option of Linear (did you mean 'in_features'?)" \
        in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_rank_zero_writes(tmp_path):
    cfg = {"seed": 0, "student": {"model": "linear", "options": {"in_features": 784}},
           "teacher": {"model": "mlp", "options": {"hidden": [32]}},
           "data": {"dataset": "digits", "test": [0, 200], "labelled": [200, 800], "batch_size": 32},
           "mode": {"name": "soft", "temperature": 2.0},
           "train": {"max_steps": 3, "progress": False, "log_every": 1}, "output": {"dir": "out"}}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "-m", "kdfast", "distill",
                           "--config", "run.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval/accuracy") == 1                  # only rank 0 prints the summary
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2      # the process group was started
    assert (tmp_path / "out" / "student.pt").is_file() and (tmp_path / "out" / "config.json").is_file()
    logs = [json.loads(line) for line in next((tmp_path / "out").rglob("log.jsonl")).read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3]      # rank 0 alone writes the log


def test_resolve_is_idempotent_and_dry_run_writes_nothing(tmp_path, capsys):
    for name in EXAMPLES:
        once = C.resolve(example(name))
        assert C.resolve(once) == once, name
        assert json.loads(json.dumps(once)) == once                    # plain JSON values
    assert distill("--config", CONFIGS / "feature.yaml", "--dry-run",
                   "--set", f"output.dir={tmp_path / 'x'}") == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "student_parameters  9098" in printed
    assert not (tmp_path / "x").exists()


def test_seeds_of_student_and_peers():
    from kdfast.demo.models import ConvStudent

    def weights(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.manual_seed(5)
    expected = weights(ConvStudent())
    run = C.build(C.apply_overrides(example("online"), ["seed=5"]))
    assert torch.equal(weights(run.student), expected)                  # student.seed null: the top seed
    torch.manual_seed(1000)
    assert torch.equal(weights(run.mode.peers[0]), weights(ConvStudent()))   # peers: their own seed
    run = C.build(C.apply_overrides(example("online"), ["seed=5", "student.seed=7"]))
    torch.manual_seed(7)
    assert torch.equal(weights(run.student), weights(ConvStudent()))
