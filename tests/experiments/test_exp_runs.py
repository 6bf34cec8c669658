"""Run folders: atomic creation, cleanup of interrupted runs, discovery."""

import pytest

from flatlora.experiments.runs import atomic_dir, clean_stale, find_runs, is_finished, write_json_atomic


def test_atomic_dir_renames_on_success_and_removes_on_error(tmp_path):
    final = tmp_path / "lora" / "seed0"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("interrupted")
    assert not final.exists() and list((tmp_path / "lora").iterdir()) == []
    with atomic_dir(final) as tmp:
        assert tmp != final and tmp.name.startswith(".")
        write_json_atomic(tmp / "run.json", {"ok": 1})
    assert is_finished(final) and find_runs(tmp_path) == [final] and find_runs(final) == [final]
    with pytest.raises(ValueError, match="already finished"):
        with atomic_dir(final):
            pass


def test_clean_stale_and_find_runs_skip_temp_folders(tmp_path):
    stale = tmp_path / "lora" / ".seed1.tmp-123"
    stale.mkdir(parents=True)
    (stale / "run.json").write_text("{}")
    assert find_runs(tmp_path) == []
    assert clean_stale(tmp_path) == [stale] and not stale.exists()
    with pytest.raises(ValueError, match="does not exist"):
        find_runs(tmp_path / "missing")


def test_a_truncated_run_json_is_not_finished_and_every_reader_names_it(tmp_path):
    from flatlora.experiments.runs import read_json, read_run, run_file_error

    run = tmp_path / "lora" / "seed0"
    with atomic_dir(run) as tmp:
        write_json_atomic(tmp / "run.json", {"label": "lora/seed0", "seed": 0})
    path = run / "run.json"
    path.write_text(path.read_text()[:20])  # '{\n  "label": "lora/s': cut inside a string
    assert not is_finished(run)
    problem = run_file_error(run)
    assert str(path) in problem and "not valid JSON" in problem and "Unterminated string" in problem
    for read in (lambda: read_run(run), lambda: read_json(path)):
        with pytest.raises(ValueError, match="Unterminated string") as exc:
            read()
        assert str(path) in str(exc.value)
    with atomic_dir(run) as tmp:  # an unfinished folder is replaced by the re-run
        write_json_atomic(tmp / "run.json", {"label": "lora/seed0", "seed": 0})
    assert is_finished(run) and run_file_error(run) is None
    path.write_text("[1, 2]\n")  # JSON, but not a run
    assert not is_finished(run) and "not an object" in run_file_error(run)
    with pytest.raises(ValueError, match="cannot read") as exc:
        read_json(tmp_path / "missing.json")
    assert str(tmp_path / "missing.json") in str(exc.value)
