"""``flatlora compare`` as a command: where its output goes, damaged run folders, config-file errors, --help.

Training is replaced by a fake `train_run` that writes a finished run (through the real `atomic_dir`) with
chosen accuracies, and the plan (which loads the task's data) by a stub, so everything else is real: resume,
report, table, plots, logging. The expected table cells are computed by hand in the comments.
"""

import json
import subprocess
import sys

import pytest

import flatlora.experiments.compare as compare_mod
import flatlora.experiments.train as train_mod
from flatlora.cli import build_parser, main
from flatlora.experiments.runs import CURVE_FILE, RUN_FILE, atomic_dir, write_json_atomic

# test / OOD accuracy of each (method, seed)
ACC = {("lora", 0): (0.80, 0.70), ("lora", 1): (0.82, 0.74),
       ("flat-lora", 0): (0.85, 0.72), ("flat-lora", 1): (0.87, 0.73)}
ARGV = ["compare", "--preset", "smoke", "--methods", "lora", "flat-lora", "--seeds", "0", "1", "--no-progress"]


@pytest.fixture
def fake_training(monkeypatch):
    """Replace training by writing a run with the accuracies of ACC; returns the list of runs trained."""
    trained = []

    def train_run(cfg, method, rank, seed, run_dir, progress=True, log=print, rho=None):
        trained.append(f"{method}/seed{seed}")
        test_acc, ood_acc = ACC[(method, seed)]
        info = {"label": f"{method}/seed{seed}", "task": cfg.task, "method": method, "rank": rank, "seed": seed,
                "rho": 0.0, "steps": 3, "n_train": 48,
                "metrics": {"test_accuracy": test_acc, "ood_accuracy": ood_acc, "train_loss": 0.5,
                            "ood": {"set": ood_acc}, "n_test": 32, "n_ood": {"set": 32}},
                "timings": {"step_s_mean": 0.1, "peak_memory_mib": 100.0, "train_s": 0.3},
                "config": cfg.to_dict()}
        with atomic_dir(run_dir) as tmp:
            write_json_atomic(tmp / CURVE_FILE, {"step": [1, 2, 3], "loss": [0.7, 0.6, 0.5], "lr": [0, 0, 0],
                                                 "sigma": [0, 0, 0]})
            write_json_atomic(tmp / RUN_FILE, info)
        log(f"{info['label']}: trained")
        return info

    monkeypatch.setattr(train_mod, "train_run", train_run)
    monkeypatch.setattr(compare_mod, "plan_text", lambda cfg: "the plan")
    return trained


def test_the_table_goes_to_stdout_and_the_log_to_stderr(fake_training, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(ARGV + ["--out", str(out)]) == 0
    printed = capsys.readouterr()
    table = (out / "table.md").read_text()
    assert printed.out == table  # `flatlora compare > table.md` captures the table and nothing else
    assert "| lora | 2 |" in table and "| flat-lora | 2 |" in table
    assert "| lora |" not in printed.err and "Paired differences" not in printed.err
    assert f"flatlora compare -> {out}" in printed.err and "flat-lora/seed1: trained" in printed.err
    assert "wrote " in printed.err
    assert "| lora | 2 |" in (out / "log.txt").read_text()  # the log file keeps the table
    # test accuracy: flat-lora - lora is 0.05 on both seeds (up to float rounding), so the t-test is undefined
    assert ("| flat-lora − lora | test_accuracy | +5.00 | n/a (all paired differences equal) | "
            "n/a (all paired differences equal) | 2 |") in table
    # OOD: differences 0.02, -0.01: mean 0.005, s = 0.0212132, se = 0.015, t = 1/3 on 1 df (Cauchy):
    # p = 1 - 2 atan(1/3) / pi = 0.79517; half-width 12.7062 * 0.015 = 0.19059 -> [-18.56, +19.56] pp
    assert "| flat-lora − lora | ood_accuracy | +0.50 | [-18.56, +19.56] | 0.795 | 2 |" in table
    def strict(token):
        raise AssertionError(f"results.json holds {token}, which is not JSON")

    saved = json.loads((out / "results.json").read_text(), parse_constant=strict)
    d = saved["paired"][0]["diffs"]["test_accuracy"]
    assert d["std"] == 0 and d["p_value"] is None and d["low"] is None  # undefined (nan) is written as null


def test_a_truncated_run_json_is_rerun_with_a_warning_naming_it(fake_training, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(ARGV + ["--out", str(out)]) == 0
    assert sorted(fake_training) == ["flat-lora/seed0", "flat-lora/seed1", "lora/seed0", "lora/seed1"]
    bad = out / "lora" / "seed1" / RUN_FILE
    bad.write_text(bad.read_text()[:40])  # cut inside a string
    capsys.readouterr()
    fake_training.clear()
    assert main(ARGV + ["--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert fake_training == ["lora/seed1"]  # only the damaged run trained again
    warning = [line for line in printed.err.splitlines() if str(bad) in line]
    assert len(warning) == 1 and "will be re-run" in warning[0] and "not valid JSON" in warning[0]
    assert json.loads(bad.read_text())["seed"] == 1
    assert printed.out == (out / "table.md").read_text() and "| lora | 2 |" in printed.out


def test_the_warning_reaches_stderr_without_echo(fake_training, tmp_path, capsys):
    from flatlora.experiments import preset

    cfg = preset("smoke", methods=["lora"], seeds=[0])
    compare_mod.compare(cfg, out=tmp_path, progress=False, echo=False)
    (tmp_path / "lora" / "seed0" / RUN_FILE).write_text("{")
    capsys.readouterr()
    compare_mod.compare(cfg, out=tmp_path, progress=False, echo=False)
    err = capsys.readouterr().err
    assert str(tmp_path / "lora" / "seed0" / RUN_FILE) in err and "will be re-run" in err
    assert "trained" not in err  # echo=False: only warnings


# --- config files -------------------------------------------------------------------------------------------
BAD_CONFIGS = {
    "missing": (None, "No such file or directory"),
    "bad.yaml": ("methods: [lora, flat-lora\n", "not valid YAML: line 2, column 1"),
    "tab.yml": ("\tseed: 1\n", "not valid YAML: line 1, column 1"),
    "bad.json": ('{"seed": 1,', "not valid JSON: line 1, column 12"),
    "list.yaml": ("- 1\n- 2\n", "expects a mapping"),
    "unknown.yaml": ("sede: 1\n", "unknown"),
}
# a value of the wrong range or kind, per command
BAD_VALUES = {
    "compare": [("lr: -1\n", "lr=-1 must be a number > 0"), ("name: 5\n", "name=5 must be a string")],
    "sharpness": [("rho: 0\n", "rho=0"), ("samples: {a: 1}\n", "samples={'a': 1} must be an integer")],
    "landscape": [("steps: 4\n", "steps=4 must be odd"), ("batches: 2.5\n", "batches=2.5 must be an integer")],
}
COMMANDS = {"compare": ["compare", "--no-progress"], "sharpness": ["sharpness", "RUN", "--no-progress"],
            "landscape": ["landscape", "RUN", "--no-progress"]}


def _cases():
    for cmd in COMMANDS:
        for name, (text, message) in BAD_CONFIGS.items():
            yield pytest.param(cmd, name, text, message, id=f"{cmd}-{name}")
        for i, (text, message) in enumerate(BAD_VALUES[cmd]):
            yield pytest.param(cmd, f"value{i}.yaml", text, message, id=f"{cmd}-value{i}")


@pytest.mark.parametrize("cmd,name,text,message", list(_cases()))
def test_a_bad_config_file_is_one_line_naming_it_exit_2(tmp_path, monkeypatch, capsys, cmd, name, text, message):
    monkeypatch.chdir(tmp_path)  # compare's default run folder would be ./runs/<name>
    path = tmp_path / ("nonexistent.yaml" if text is None else name)
    if text is not None:
        path.write_text(text)
    argv = [str(tmp_path) if a == "RUN" else a for a in COMMANDS[cmd]] + ["--config", str(path)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"flatlora {cmd}: error: ") and str(path) in lines[0] and message in lines[0]
    assert not (tmp_path / "runs").exists()


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    """The real entry point (a fresh process): no traceback reaches the terminal."""
    proc = subprocess.run([sys.executable, "-m", "flatlora.cli", "landscape", str(tmp_path), "--config",
                           str(tmp_path / "nonexistent.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"flatlora landscape: error: config file {str(tmp_path / 'nonexistent.yaml')!r}: cannot read it: "
        "No such file or directory"]


# --- help ---------------------------------------------------------------------------------------------------
def _subcommands():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(sub.choices)


def test_no_help_text_shows_a_doubled_percent_sign(capsys):
    commands = _subcommands()
    assert {"compare", "sharpness", "landscape"} <= set(commands)
    for argv in [["--help"]] + [[c, "--help"] for c in commands]:
        try:  # argparse's --help exits; `train` prints its recipe keys itself and returns
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
        assert rc == 0, argv
        text = capsys.readouterr().out
        assert "%%" not in text, argv
        if argv[0] == "compare":
            assert "95% confidence intervals" in " ".join(text.split())


def test_one_seed_prints_the_mean_difference_and_no_test(fake_training, tmp_path, capsys):
    argv = [a for a in ARGV if a != "1"] + ["--out", str(tmp_path)]
    assert argv.count("--seeds") == 1 and main(argv) == 0
    out = capsys.readouterr().out
    # 0.85 - 0.80 = 0.05 -> +5.00 pp; one pair: no interval and no p-value
    assert "| flat-lora − lora | test_accuracy | +5.00 | n/a (1 seed) | n/a (1 seed) | 1 |" in out
    assert "| lora | 1 | 80.00 |" in out
