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
