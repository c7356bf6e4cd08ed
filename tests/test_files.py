"""Atomic writes and locks: the one copy every module uses."""

from __future__ import annotations

import pathlib

import pytest

from dps_tune import files


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    files.write_json(target, {"v": 1})
    real_write = pathlib.Path.write_text

    def dies_halfway(self, text, *args, **kwargs):
        real_write(self, text[:3], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", dies_halfway)
    with pytest.raises(OSError):
        files.write_json(target, {"v": 2})
    monkeypatch.undo()
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert not list(tmp_path.glob(files.TEMP_GLOB))


def test_atomic_directory_replaces_the_old_one(tmp_path):
    target = tmp_path / "ckpt"
    for value in ("old", "new"):
        with files.atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(value)
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_held_lock_is_reported_not_waited_for(tmp_path):
    lock = tmp_path / ".lock"
    with files.file_lock(lock) as first:
        assert first
        # flock locks belong to an open file description: a second open in this process
        # conflicts with the first exactly as another process would.
        with files.file_lock(lock, blocking=False) as second:
            assert second is False
    with files.file_lock(lock, blocking=False) as third:
        assert third


@pytest.mark.parametrize("content", [None, "", '{"step": 4, "id_val', "[1, 2]", b"\xff\xfe{}"])
def test_a_damaged_json_file_is_one_line_or_passed_over(tmp_path, content):
    """The strict reader names the file in one UserError; the tolerant one returns None; a whole object reads."""
    path = tmp_path / "metrics.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(files.UserError, match=f"checkpoint x: {path.name} is"):
        files.read_json_object(path, "checkpoint x")
    assert files.json_object_or_none(path) is None
    files.write_json(path, {"step": 4})
    assert files.read_json_object(path, "checkpoint x") == files.json_object_or_none(path) == {"step": 4}
