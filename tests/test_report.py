"""``dqrm-compress report`` and the ``report.html`` the main job writes beside the manifest.

The page parses, names every table, holds one ``<svg>`` per plot (each with its title), loads
nothing from the network, is the same bytes for the same inputs and seed (and the same as the
command draws later), is listed and hashed in the manifest (``verify`` passes); older artifacts
without ``report_data.json`` still render and say what is not recorded; a bad path or a missing
matplotlib is one line and exit code 2. The measurements behind it (reconstruction error, score
histograms) are checked against direct computations.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_world

from compress import pipeline
from compress.cli.main import main
from compress.io.fingerprint import sha256_state_dict
from compress.io.table_stream import chunking
from compress.methods import reconstruction
from compress.methods.apply_plan import convert_model, prepare_model
from compress.methods.reconstruction import measure_tables, row_readers, table_error
from compress.report_format import REPORT_DATA_FILE, REPORT_HTML
from compress.train.metrics import auc
from compress.train.score_histogram import score_histogram
from exporters.artifacts.manifest_integrity import dump_manifest, seal
from exporters.report.data import Histogram, calibration_points, roc_auc, roc_points
from exporters.report.plots import PLOTS

QAT_RECIPE = """
name = "report_qat"
[[tables]]
match = ["t_cat_0"]
method = "keep"
[[tables]]
match = ["t_cat_1"]
method = "qat"
bits = 8
granularity = "table"
[[tables]]
match = ["*"]
method = "qat"
bits = 4
granularity = "row"
[mlp]
method = "qat"
bits = 8
[finetune]
steps = 12
batch_size = 256
eval_every = 4
"""
TABLES = ("t_cat_0", "t_cat_1", "t_cat_2", "t_cat_3")
PLOT_TITLES = {
    "bytes": "Bytes per table, before and after",
    "training": "AUC and log loss over fine-tuning steps",
    "reconstruction": "Reconstruction error per table",
    "roc": "ROC, baseline vs compressed",
    "calibration": "Calibration, baseline vs compressed",
    "parity": "ONNX Runtime parity per graph",
}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def compress_job(capsys, world, recipe: Path, out: Path, *extra) -> Path:
    ckpt, train, valid, _ = world
    code, _, err = run(capsys, "--recipe", recipe, ckpt, "--out", out, *extra)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_world")
    ckpt, train, valid, model = tiny_world(root)
    recipe = root / "report_qat.toml"
    recipe.write_text(QAT_RECIPE)
    return ckpt, train, valid, recipe


@pytest.fixture(scope="module")
def artifacts(world, tmp_path_factory):
    """The main job's artifacts (QAT, with data and validation data), shared read-only."""
    ckpt, train, valid, recipe = world
    out = tmp_path_factory.mktemp("report_out") / "out"
    code = main(
        ["--no-progress", "--recipe", str(recipe), str(ckpt), "--data", str(train)]
        + ["--valid", str(valid), "--out", str(out)]
    )
    assert code == 0
    return out


class Page(HTMLParser):
    """What the tests look at: every start tag with its attributes, the figures' ids, the text
    of each ``<svg>``'s ``<title>``, and all the text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.svg_titles: list[str] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.stack.append(tag)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data):
        self.text.append(data)
        if self.stack[-2:] == ["svg", "title"]:
            self.svg_titles.append(data)

    def count(self, tag: str) -> int:
        return sum(1 for t, _ in self.tags if t == tag)

    def figures(self) -> list[str]:
        return [a.get("id") for t, a in self.tags if t == "figure"]

    def all_text(self) -> str:
        return " ".join(self.text)


# --------------------------------------------------------------------------------------------
# the main job's report


def test_main_job_writes_the_report_listed_hashed_and_verified(artifacts, capsys):
    manifest = json.loads((artifacts / "manifest.json").read_text())
    for name in (REPORT_HTML, REPORT_DATA_FILE):
        entry = manifest["files"][name]
        assert entry["sha256"] == hashlib.sha256((artifacts / name).read_bytes()).hexdigest()
    code, out, err = run(capsys, "verify", artifacts)
    assert code == 0 and out.startswith("ok:"), err


def test_report_parses_and_holds_every_table_and_plot(artifacts):
    page = Page((artifacts / REPORT_HTML).read_text(encoding="utf-8"))
    assert page.count("svg") == len(PLOTS) == len(PLOT_TITLES)
    assert page.figures() == [f"plot-{name}" for name in PLOTS]
    assert page.svg_titles == [PLOT_TITLES[name] for name in PLOTS]
    rows = [a for t, a in page.tags if t == "tr"]
    assert len(rows) >= len(TABLES) + 1  # the plan table: every table and the MLPs
    text = page.all_text()
    for name in (*TABLES, "MLPs", "report_qat", "checkpoint sha256", "Provenance"):
        assert name in text, name
    assert "control run" in text and "not recorded" in text  # the control is said to be absent


def test_report_loads_nothing_from_the_network(artifacts):
    html = (artifacts / REPORT_HTML).read_text(encoding="utf-8")
    page = Page(html)
    links = [v for _, a in page.tags for k, v in a.items() if k in ("src", "href", "xlink:href")]
    assert links and all(v.startswith("#") for v in links)  # only references within the page
    assert not [t for t, _ in page.tags if t in ("script", "link", "img", "iframe", "object")]
    assert "@import" not in html and "url(http" not in html and "<!DOCTYPE svg" not in html
    ids = [a["id"] for _, a in page.tags if "id" in a]
    assert len(ids) == len(set(ids))  # plots inlined together never share an id


@pytest.mark.slow  # a second main job
def test_report_is_the_same_bytes_for_the_same_inputs_and_seed(artifacts, world, tmp_path, capsys):
    ckpt, train, valid, recipe = world
    again = compress_job(
        capsys, world, recipe, tmp_path / "again", "--data", train, "--valid", valid
    )
    assert (again / REPORT_HTML).read_bytes() == (artifacts / REPORT_HTML).read_bytes()
    assert (again / REPORT_DATA_FILE).read_bytes() == (artifacts / REPORT_DATA_FILE).read_bytes()
    code, out, err = run(capsys, "report", artifacts, "--out", tmp_path / "later.html")
    assert code == 0 and f"({len(PLOTS)} plots)" in out, err
    assert (tmp_path / "later.html").read_bytes() == (artifacts / REPORT_HTML).read_bytes()


def test_report_data_holds_what_the_plots_are_drawn_from(artifacts):
    data = json.loads((artifacts / REPORT_DATA_FILE).read_text())
    manifest = json.loads((artifacts / "manifest.json").read_text())
    errors = {t["name"]: t for t in data["reconstruction"]["tables"]}
    assert errors["t_cat_0"]["exact"] and errors["t_cat_0"]["relative_rmse"] == 0.0  # kept
    assert all(errors[t]["relative_rmse"] > 0 for t in TABLES[1:])
    assert all(errors[t]["relative_rmse_weighted"] is not None for t in TABLES[1:])
    n = manifest["metrics"]["baseline"]["n"]
    for model in ("baseline", "compressed"):
        h = data["scores"][model]
        assert sum(h["negatives"]) + sum(h["positives"]) == n
    assert data["selection_baseline"]["slice"] == manifest["train"]["selected_on"]["slice"]
    assert len(data["checkpoint"]["sha256"]) == 64


# --------------------------------------------------------------------------------------------
# older and smaller artifacts


def _without_report_files(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as artifacts written before the report existed: no ``report_data.json``
    or ``report.html``, the manifest resealed without them."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for name in (REPORT_HTML, REPORT_DATA_FILE):
        (dst / name).unlink()
        del manifest["files"][name]
    (dst / "manifest.json").write_text(dump_manifest(seal(manifest)))
    return dst


def test_old_artifacts_render_what_exists_and_say_what_is_not_recorded(artifacts, tmp_path, capsys):
    old = _without_report_files(artifacts, tmp_path / "old")
    assert run(capsys, "verify", old)[0] == 0
    code, out, err = run(capsys, "report", old, "--out", tmp_path / "old.html")
    assert code == 0, err
    assert "not recorded: bytes before per table" in err
    page = Page((tmp_path / "old.html").read_text(encoding="utf-8"))
    assert page.figures() == ["plot-bytes", "plot-training", "plot-parity"]
    text = page.all_text()
    assert "Not recorded" in text and REPORT_DATA_FILE in text
    assert all(name in text for name in TABLES)


def test_ptq_without_data_says_curves_and_scores_are_not_recorded(world, tmp_path, capsys):
    ckpt, *_ = world
    recipe = tmp_path / "ptq.toml"
    recipe.write_text('name = "ptq"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 8\n')
    out = compress_job(capsys, world, recipe, tmp_path / "ptq")
    page = Page((out / REPORT_HTML).read_text(encoding="utf-8"))
    assert page.figures() == ["plot-bytes", "plot-reconstruction", "plot-parity"]
    text = page.all_text()
    assert "the recipe does not fine-tune" in text and "no validation data" in text.lower()
    assert "no training data" in text  # the reconstruction error is not frequency-weighted


# --------------------------------------------------------------------------------------------
# errors


def test_bad_artifacts_path_is_one_line_and_exit_2(artifacts, tmp_path, capsys):
    for argv in (
        ["report", tmp_path / "missing"],
        ["report", artifacts / "manifest.json"],
        ["report", artifacts, "--out", artifacts / "mine.html"],
        ["report", artifacts, "--out", tmp_path / "no" / "such" / "dir.html"],
    ):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (artifacts / "mine.html").exists()


def test_changed_report_data_is_refused(artifacts, tmp_path, capsys):
    changed = shutil.copytree(artifacts, tmp_path / "changed")
    (changed / REPORT_DATA_FILE).write_text('{"version": 1}\n')
    code, _, err = run(capsys, "report", changed, "--out", tmp_path / "x.html")
    assert code == 2 and "changed since export" in err and err.count("\n") == 1


def test_malformed_report_data_resealed_is_one_line_naming_the_key(artifacts, tmp_path, capsys):
    edited = shutil.copytree(artifacts, tmp_path / "edited")
    data = json.loads((edited / REPORT_DATA_FILE).read_text())
    data["scores"]["baseline"]["positives"] = "many"
    (edited / REPORT_DATA_FILE).write_text(json.dumps(data))
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["files"][REPORT_DATA_FILE] = {
        "sha256": hashlib.sha256((edited / REPORT_DATA_FILE).read_bytes()).hexdigest(),
        "bytes": (edited / REPORT_DATA_FILE).stat().st_size,
    }
    (edited / "manifest.json").write_text(dump_manifest(seal(manifest)))
    code, _, err = run(capsys, "report", edited, "--out", tmp_path / "x.html")
    assert code == 2 and err.count("\n") == 1
    assert f"{REPORT_DATA_FILE}: scores.baseline.positives: expected a list" in err


def test_without_matplotlib_report_says_so_and_the_main_job_notes_the_skip(
    world, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    ckpt, *_ = world
    recipe = tmp_path / "ptq.toml"
    recipe.write_text('name = "ptq"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 8\n')
    out = compress_job(capsys, world, recipe, tmp_path / "ptq", "--json")
    assert not (out / REPORT_HTML).exists() and (out / REPORT_DATA_FILE).exists()
    note = json.loads((out / "manifest.json").read_text())["notes"][-1]
    assert note.startswith("report.html not written: matplotlib is not installed")
    assert run(capsys, "verify", out)[0] == 0
    code, _, err = run(capsys, "report", out, "--out", tmp_path / "r.html")
    assert code == 2 and "matplotlib is not installed" in err and err.count("\n") == 1


def test_report_help_does_not_import_matplotlib():
    code = (
        "import sys; from compress.cli.main import main; main(['report', '--help']); "
        "print('matplotlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ARTIFACTS" in done.stdout and done.stdout.strip().endswith("False")


# --------------------------------------------------------------------------------------------
# the measurements


def test_table_error_is_the_relative_rmse_plain_and_weighted_whatever_the_chunks():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 4, generator=g)
    noise = 0.1 * torch.randn(50, 4, generator=g)
    counts = torch.zeros(50, dtype=torch.int64)
    counts[:10] = torch.arange(1, 11)

    def read(ids: torch.Tensor) -> torch.Tensor:
        return (w + noise)[ids]

    plain = float(noise.double().norm() / w.double().norm())
    c = counts.double()[:, None]
    weighted = float(((c * noise.double() ** 2).sum() / (c * w.double() ** 2).sum()).sqrt())
    for rows in (3, 50):
        with chunking(rows):
            e = table_error("t", w, read, counts)
        assert e.relative_rmse == pytest.approx(plain, rel=1e-5)
        assert e.relative_rmse_weighted == pytest.approx(weighted, rel=1e-5)
        assert e.rows_seen == 10
    assert table_error("t", w, lambda ids: w[ids]).relative_rmse == 0.0


def test_large_tables_sample_every_kth_row_for_the_plain_error_and_all_seen_rows_weighted(
    monkeypatch,
):
    monkeypatch.setattr(reconstruction, "SAMPLE_ROWS", 8)  # 50 rows: every 6th row, 9 rows
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 4, generator=g)
    noise = torch.randn(50, 4, generator=g) * torch.linspace(0.01, 1.0, 50)[:, None]
    counts = torch.zeros(50, dtype=torch.int64)
    counts[[1, 2, 33]] = torch.tensor([5, 1, 2])
    looked_up: list[int] = []

    def read(ids: torch.Tensor) -> torch.Tensor:
        looked_up.extend(ids.tolist())
        return (w + noise)[ids]

    rows = torch.arange(0, 50, 6)
    plain = float(noise[rows].double().norm() / w[rows].double().norm())
    c = counts.double()[:, None]
    weighted = float(((c * noise.double() ** 2).sum() / (c * w.double() ** 2).sum()).sqrt())
    with chunking(7):
        e = table_error("t", w, read, counts)
    assert sorted(looked_up) == sorted({*rows.tolist(), 1, 2, 33})  # nothing else read
    assert e.rows_measured == 9 and e.relative_rmse == pytest.approx(plain, rel=1e-5)
    assert e.relative_rmse_weighted == pytest.approx(weighted, rel=1e-5)


def test_one_pass_gives_every_table_error_and_the_resume_fingerprint(world):
    ckpt, train, valid, recipe = world
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, recipe)
    model, shared = prepare_model(job.module, job.spec, plan)
    model = convert_model(model)
    with chunking(7):  # chunks that do not divide the tables' rows
        measured = measure_tables(job.module, model, job.spec, plan, shared)
    assert measured.checkpoint_sha256 == sha256_state_dict(job.module.state_dict())
    bags = job.module.sparse_arch.embedding_bag_collection.embedding_bags
    readers = row_readers(model, shared)
    for e in measured.errors:
        if e.exact:
            assert e.name == "t_cat_0" and e.relative_rmse == 0.0
            continue
        w = bags[e.name].weight.detach()
        v = readers[e.name](torch.arange(w.shape[0]))
        assert e.relative_rmse == pytest.approx(float((v - w).norm() / w.norm()), rel=1e-5)
    without = measure_tables(job.module, model, job.spec, plan, shared, fingerprint=False)
    assert without.errors == measured.errors and without.checkpoint_sha256 is None


def test_score_histogram_gives_roc_and_calibration_close_to_the_exact_ones():
    rng = np.random.default_rng(0)
    logits = rng.normal(-1.0, 1.5, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    h = score_histogram(logits, labels).to_json()
    hist = Histogram(
        np.array(h["negatives"]), np.array(h["positives"]), np.array(h["probability_sums"])
    )
    fpr, tpr = roc_points(hist)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert roc_auc(fpr, tpr) == pytest.approx(auc(logits, labels), abs=2e-3)
    points = calibration_points(hist)
    assert sum(p.rows for p in points) == 20_000 and len(points) >= 15
    assert all(abs(p.predicted - p.observed) < 0.05 for p in points)  # calibrated by construction
