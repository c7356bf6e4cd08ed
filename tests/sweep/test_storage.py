"""Experiments behind a URI: mirrored for reading, weights fetched on demand, files written through pyarrow."""

from __future__ import annotations

import shutil

import pytest

from dps_tune.errors import UserError
from dps_tune.sweep import storage


def _experiment(root):
    ckpt = root / "trial_a" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (root / "dps_tune_sweep.json").write_text('{"name": "exp"}')
    (root / "trial_a" / "result.json").write_text('{"step": 1}\n')
    (ckpt / "metrics.json").write_text('{"id_val_acc": 0.5}')
    (ckpt / "model.safetensors").write_bytes(b"weights" * 100)
    (ckpt / "train_state.pt").write_bytes(b"state")
    return ckpt


def test_a_uri_is_mirrored_without_its_weights_which_come_on_demand(tmp_path):
    ckpt = _experiment(tmp_path / "store" / "exp")
    uri = f"file://{tmp_path / 'store' / 'exp'}"
    view = storage.local_view(uri)
    assert view != tmp_path / "store" / "exp"
    assert (view / "dps_tune_sweep.json").read_text() == '{"name": "exp"}'
    local = view / "trial_a" / "checkpoint_000001"
    assert (local / "metrics.json").is_file() and not (local / "model.safetensors").exists()
    assert (local / "model.safetensors.remote").read_text() == "700" and storage.has_weights(local)
    assert storage.source(local) == f"{uri}/trial_a/checkpoint_000001"
    assert storage.source(view) == uri
    storage.fetch_weights(local)
    assert (local / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()

    # the mirror follows the storage: a checkpoint Ray deleted there is gone here too
    shutil.rmtree(ckpt)
    assert not (storage.local_view(uri) / "trial_a" / "checkpoint_000001").exists()


def test_a_local_path_is_read_in_place(tmp_path):
    _experiment(tmp_path / "exp")
    assert storage.local_view(tmp_path / "exp") == tmp_path / "exp"
    assert storage.has_weights(tmp_path / "exp" / "trial_a" / "checkpoint_000001")


def test_writing_and_copying_through_a_uri(tmp_path):
    uri = f"file://{tmp_path / 'store'}"
    storage.write_text(storage.join(uri, "exp", "meta.json"), "{}")
    assert (tmp_path / "store" / "exp" / "meta.json").read_text() == "{}"
    assert storage.exists(storage.join(uri, "exp", "meta.json"))
    assert not storage.exists(storage.join(uri, "exp", "nothing.json"))
    (tmp_path / "db").write_bytes(b"sqlite")
    storage.upload(tmp_path / "db", storage.join(uri, "exp", "optuna.db"))
    assert storage.download(storage.join(uri, "exp", "optuna.db"), tmp_path / "back" / "optuna.db")
    assert (tmp_path / "back" / "optuna.db").read_bytes() == b"sqlite"
    assert not storage.download(storage.join(uri, "exp", "missing"), tmp_path / "x")


@pytest.mark.parametrize("location,message", [
    ("file:///nonexistent/dps_tune/exp", "no such directory on the storage"),
    ("nosuchscheme://bucket/exp", "not a storage URI pyarrow can open"),
    ("mounted://never-mounted/exp", "nothing is mounted as 'never-mounted' in this process"),
])
def test_bad_locations_are_one_line(location, message):
    with pytest.raises(UserError, match=message):
        storage.local_view(location)


def test_a_mounted_filesystem_is_read_and_written_through(tmp_path):
    import pyarrow.fs as pafs

    _experiment(tmp_path / "bucket" / "runs" / "exp")
    root = storage.mount("unit-storage", pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()))
    view = storage.local_view(f"{root}/runs/exp")
    assert (view / "dps_tune_sweep.json").read_text() == '{"name": "exp"}'
    storage.fetch_weights(view / "trial_a" / "checkpoint_000001")
    assert (view / "trial_a" / "checkpoint_000001" / "model.safetensors").read_bytes() == b"weights" * 100
    storage.write_text(f"{root}/runs/exp/note.txt", "hello")
    assert (tmp_path / "bucket" / "runs" / "exp" / "note.txt").read_text() == "hello"


def test_a_uri_query_belongs_to_the_storage_not_to_a_file():
    """``?endpoint_override=…&scheme=http`` (a non-AWS S3 store) stays last, whatever is joined to the path."""
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    exp = storage.join(uri, "exp")
    assert exp == "s3://bucket/runs/exp?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    assert storage.join(exp, "t", "metrics.json").startswith("s3://bucket/runs/exp/t/metrics.json?endpoint_override=")
    fs, path = storage.resolve(storage.join(exp, "t"))
    options = fs.__reduce__()[1][0]  # what the filesystem was opened with, as Ray's workers unpickle it
    assert path == "bucket/runs/exp/t" and options["endpoint_override"] == "127.0.0.1:9"
    assert options["scheme"] == "http"
    assert storage.join("/data/a?b", "c") == "/data/a?b/c"  # a local path: '?' is part of a name


def test_the_round_trip_check_is_for_s3_only(tmp_path):
    storage.check_round_trip(f"file://{tmp_path / 'exp'}")  # a local disk keeps what it is given
    assert not (tmp_path / "exp").exists()
