"""Bring your own method (issue #18): plugins from a file and from an entry point, ``--methods``, suites as files,
generators as MLflow pyfunc models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from benchmark import plugins
from benchmark.cli import main
from benchmark.config import SIZE_RULES
from benchmark.registry import METHODS, SUITES
from benchmark.suites import edit_rows, load_suite_file, parse_suite, suite_to_toml
from benchmark.tracking import PARENT_TAG

ROOT = Path(__file__).resolve().parents[1]

# A complete method in a file of its own: a learned mean volume plus noise, trained by the harness (smoke-fast).
PLUGIN = '''
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.registry import METHODS
from models.base import GenerativeMethod


class Template(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.volume = nn.Parameter(torch.zeros(1, 1, size, size, size))
        self.clinical = nn.Linear(7, size ** 3)
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, noise, c):
        return self.volume + 0.01 * self.clinical(c).view(noise.shape) + self.scale * noise


@METHODS.register("mymethod")
class MyMethod(GenerativeMethod):
    """A learned mean volume, a linear map of c and scaled noise (the plugin of tests/test_plugins.py)."""

    conditional = True

    def __init__(self, cfg, heads=None):
        super().__init__(cfg)
        self.G = Template(cfg.data.size)

    def configure_optimizers(self):
        return {"G": torch.optim.Adam(self.G.parameters(), lr=0.1)}

    def training_step(self, batch, step):
        x = batch["x"]
        noise = self.batch_noise("noise", x.shape[0], tuple(x.shape[1:]), step, x.device)
        loss = F.l1_loss(self.G(noise, batch["c"]), x)
        self.optimize("G", loss)
        return {"loss_rec": float(loss.detach())}

    @torch.no_grad()
    def sample(self, n, c=None, generator=None):
        volume = self.G_eval.volume
        noise = torch.randn((n, *volume.shape[1:]), generator=generator).to(volume.device)
        return self.G_eval(noise, c.to(volume.device))
'''


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch):
    """Plugins register into process-wide registries: give every test its own copy, and an empty
    BENCHMARK_PLUGINS (``--plugin`` appends to it) that is restored afterwards."""
    from benchmark.catalog import load_all

    monkeypatch.setenv(plugins.ENV_VAR, "")
    load_all()  # the built-in methods (once a process: modules register when first imported), then the copies
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    monkeypatch.setattr(plugins, "_LOADED", {})
    monkeypatch.setattr(plugins, "_METHOD_PLUGIN", {})
    monkeypatch.setattr("benchmark.config.SIZE_RULES", dict(SIZE_RULES))


def _plugin_file(tmp_path: Path, text: str = PLUGIN, name: str = "my_plugin.py") -> Path:
    path = tmp_path / "plugins" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_plugin_file_runs_in_a_suite_with_tags_table_row_and_reuse(registries, mlflow_uri: str,
                                                                    smoke_args: list[str], tmp_path: Path,
                                                                    monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    plugin = _plugin_file(tmp_path)
    # only the plugin trains: bare names replace the suite's trained rows, its reference rows stay
    argv = ["run", "--suite", "table3", *smoke_args, "--plugin", str(plugin), "--methods", "mymethod"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("brainmri/table3")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'suite' and params.methods = 'mymethod'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["references"] == "real,train_copy,mean_volume,medoid"
    kids = client.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert sorted(k.data.tags["method"] for k in kids) == ["mean_volume", "medoid", "mymethod", "real", "train_copy"]
    mine = next(k for k in kids if k.data.tags["method"] == "mymethod")
    assert mine.info.status == "FINISHED" and mine.data.tags["evaluated"] == "1"
    assert mine.data.tags["plugin"] == str(plugin.resolve())
    assert mine.data.tags["plugin_version"].startswith("sha256:") and mine.data.tags["config_digest"]
    assert "fid_resnet18" in mine.data.metrics and "loss_rec" in mine.data.metrics
    assert not any("plugin" in k.data.tags for k in kids if k.data.tags["method"] != "mymethod")
    table = client.download_artifacts(parent.info.run_id, "tables/table3.md", str(tmp_path))
    row = next(line for line in Path(table).read_text().splitlines() if line.startswith("| mymethod "))
    assert "n/a" not in row.split("|")[3]  # the FID column has a value
    assert "| wgan_gp " not in printed and row in printed
    # `report` rebuilds the table from the store alone: the rows the parent logged, not the suite's defaults
    assert main(["report", "--suite", "table3"]) == 0
    assert capsys.readouterr().out.strip() in printed
    # a second run finds the finished child by its config digest, as for every built-in method
    assert main(argv) == 0
    assert "mymethod-seed0: reused finished run" in capsys.readouterr().out
    # the generator as an MLflow model: the same volumes as `generate` for the same clinical vector and seed
    import mlflow.pyfunc
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from benchmark.data.contract import ROI_NAMES

    model = mlflow.pyfunc.load_model(f"runs:/{mine.info.run_id}/generator")
    assert model.metadata.signature.inputs.input_names() == [*ROI_NAMES, "diagnosis"]
    ratios = dict(zip(ROI_NAMES, (0.0031, 0.0032, 0.0011, 0.0011, 0.008, 0.0075), strict=True))
    volumes = model.predict(pd.DataFrame([{**ratios, "diagnosis": "AD"}] * 3), params={"seed": 3})
    out = tmp_path / "generated"
    assert main(["generate", "--run-id", mine.info.run_id, "--plugin", str(plugin), "--n", "3", "--seed", "3",
                 "--label", "AD", "--allow-extrapolation", "--out", str(out),
                 *[f"--{k.replace('_', '-')}={v}" for k, v in ratios.items()]]) == 0
    written = np.stack([np.asarray(nib.load(str(out / f"gen_{i:04d}.nii.gz")).dataobj) for i in range(3)])
    assert volumes.shape == (3, 16, 16, 16) and volumes.dtype == np.float32
    np.testing.assert_array_equal(volumes, written)
    assert not np.array_equal(volumes[0], volumes[1])  # one generator across the rows, as in `generate`


def test_entry_point_of_an_installed_distribution_registers_a_method(tmp_path: Path) -> None:
    # What `pip install` leaves in site-packages, reduced to what importlib.metadata reads: a *.dist-info folder
    # (METADATA, entry_points.txt) on sys.path beside the module. Discovery is the same code path as for an
    # installed wheel, without touching the project's virtual environment.
    site = tmp_path / "site"
    (site / "mydist-0.1.dist-info").mkdir(parents=True)
    (site / "mydist-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mydist\nVersion: 0.1\n")
    (site / "mydist-0.1.dist-info" / "entry_points.txt").write_text("[brainmri.methods]\nmymethod = mydist_plugin\n")
    (site / "mydist_plugin.py").write_text(PLUGIN)
    code = ("from benchmark.cli import main; main(['list']); "
            "main(['run', '--suite', 'table3', '--methods', '+mymethod', '--preset', 'smoke', '--dry-run'])")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    env.pop(plugins.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "  mymethod " in out.stdout and "[plugin mydist:mymethod = mydist_plugin]" in out.stdout
    assert ("# suite table3: references real, train_copy, mean_volume, medoid; methods wgan_gp, stylegan2, ours, "
            "mymethod") in out.stdout


@pytest.mark.parametrize("text, needle", [
    (PLUGIN.replace('"mymethod"', '"vae"'), "method 'vae' is already registered by a built-in module"),
    ("import no_such_module_for_this_test\n", "failed to import (ModuleNotFoundError: No module named"),
    ("def broken(:\n", "failed to import (SyntaxError"),
])
def test_clash_or_import_failure_is_one_line_naming_the_plugin(registries, text: str, needle: str, tmp_path: Path,
                                                               capsys) -> None:
    plugin = _plugin_file(tmp_path, text)
    assert main(["list", "--plugin", str(plugin)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"plugin {plugin.resolve()}" in err and needle in err


def test_second_plugin_with_a_taken_name_names_the_first(registries, tmp_path: Path, capsys, monkeypatch) -> None:
    first, second = _plugin_file(tmp_path, name="first.py"), _plugin_file(tmp_path, name="second.py")
    assert main(["list", "--plugin", str(first), "--plugin", str(second)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: plugin {second.resolve()}: method 'mymethod' is already registered by plugin "
                          f"{first.resolve()}")
    monkeypatch.setenv(plugins.ENV_VAR, "")  # --plugin appended both files to it
    assert main(["list", "--plugin", "no_such_plugin_module"]) == 2
    assert "plugin no_such_plugin_module failed to import" in capsys.readouterr().err


def test_methods_edits_rows_of_a_suite(registries, tmp_path: Path, capsys) -> None:
    table3 = SUITES.get("table3")
    assert edit_rows(table3, "-stylegan2,+vae").methods == ("wgan_gp", "ours", "vae")
    edited = edit_rows(table3, "vae,ours,mean_volume")
    assert edited.methods == ("vae", "ours") and edited.references == table3.references
    assert edit_rows(table3, "-real").references == ("train_copy", "mean_volume", "medoid")
    for spec, needle in [("+nope", "unknown method 'nope'"), ("-vae", "-vae: not a row of suite 'table3'"),
                         ("vae,-ours", "not both")]:
        assert main(["run", "--suite", "table3", "--methods", spec, "--preset", "smoke", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    # in a composite, a removal applies where the row is, and must hit at least one suite
    assert main(["run", "--suite", "all", "--methods", "-vae", "--preset", "smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "methods vaegan, xvaegan, xvaegan_clin, ours\n" in out and "methods wgan_gp, stylegan2, ours\n" in out


# The suites as they were written in code before they became files (benchmark/suites.py at 0d44aa4), plus the
# `FID (anat.)` column added since (the FID network's trained block alone; DESIGN §9).
TABLE_METRICS = ("params", "fid_resnet18", "fid_resnet18anat", "fid_resnet18sep", "ssim_triplanar",
                 "lpips_triplanar_alex", "ssim_nn_triplanar", "lpips_nn_triplanar_alex")
REFS = ("real", "train_copy", "mean_volume", "medoid")
BEFORE = {
    "table2": dict(methods=("vae", "vaegan", "xvaegan", "xvaegan_clin", "ours"), metrics=TABLE_METRICS,
                   references=REFS),
    "table3": dict(methods=("wgan_gp", "stylegan2", "ours"), metrics=TABLE_METRICS, references=REFS),
    "table4": dict(methods=("ours", "ours_noaux"), metrics=("bac", "roi_mse", "volume_consistency"), real_row=True,
                   references=("train_copy", "mean_volume")),
    "prior": dict(methods=(), metrics=(), prior_eval=True),
    "utility": dict(methods=("wgan_gp", "stylegan2", "ours", "ours_noaux"), metrics=("nn_ratio",), utility=True),
    "validity": dict(methods=(), metrics=(), validity=True),
}


@pytest.mark.parametrize("name", list(BEFORE))
def test_builtin_suite_files_define_the_suites_as_before(name: str) -> None:
    suite = SUITES.get(name)
    flags = {"real_row": False, "prior_eval": False, "utility": False, "validity": False, "references": ()}
    for key, value in {**flags, **BEFORE[name]}.items():
        assert getattr(suite, key) == value, (name, key)
    assert parse_suite(suite_to_toml(suite), name) == suite  # what a parent run logs as suite.toml reads back


def test_a_suite_file_reproduces_table3_and_its_config_sits_between_config_and_set(tmp_path: Path,
                                                                                   capsys) -> None:
    path = tmp_path / "table3.toml"
    path.write_text('title = "Table 3: baselines on identical data, splits, resolution and budget"\n'
                    'description = """\n' + SUITES.get("table3").description + '\n"""\n'
                    'references = ["real", "train_copy", "mean_volume", "medoid"]\n'
                    'methods = ["wgan_gp", "stylegan2", "ours"]\n'
                    f'metrics = {list(TABLE_METRICS)!r}\n'.replace("'", '"') + 'seeds = 1\n')
    assert load_suite_file(path) == SUITES.get("table3")
    mine = tmp_path / "mine.toml"
    mine.write_text(path.read_text() + '\n[config]\n"train.budget_volumes" = 40\n[config.eval]\nn_draws = 1\n')
    suite = load_suite_file(mine)
    assert suite.name == "mine" and dict(suite.config) == {"train.budget_volumes": 40, "eval.n_draws": 1}
    assert main(["run", "--suite-file", str(mine), "--preset", "smoke", "--set", "eval.n_draws=2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"train.budget_volumes": 40' in out and '"eval.n_draws": 2' in out
    for text, needle in [("title = 'x'\nrows = []\n", "unknown key(s) 'rows'"),
                         ("title = 'x'\nsteps = ['nope']\n", "unknown step(s) 'nope'"),
                         ("title = 'x'\n[config]\n'train.nope' = 1\n", "unknown key(s) 'train.nope'"),
                         ("title = 'x'\nmetrics = ['ssim_triplanar', 'fid_medicalnet18']\n",
                          "metric 'fid_medicalnet18' has no table column"),
                         ("title = [\n", "invalid TOML")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        assert main(["run", "--suite-file", str(bad), "--preset", "smoke", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
