"""A full disk while a verb writes its output: one error naming the output and the reason, nothing partial left.

Libraries report a full disk each in their own way: safetensors as a SafetensorError ("No space left on device
(os error 28)"), torch as a RuntimeError ("PytorchStreamWriter failed writing file"), gguf (numpy's tofile) as an
OSError without errno ("N requested and M written"). Each is raised here where the library would raise it."""

from __future__ import annotations

import errno
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.files import write_failure

_Usage = namedtuple("usage", "total used free")
_REAL_USAGE = shutil.disk_usage
GGUF_SHORT_WRITE = OSError("3145728 requested and 1261152 written")


def _full_while(monkeypatch, partial: Path | None = None) -> None:
    """shutil.disk_usage says 0 bytes free while `partial` exists (everywhere, without one): the disk a write
    filled, which has room again once the partial files are removed."""
    def usage(path):
        full = partial is None or partial.exists() or any(partial.parent.glob(f".{partial.name}*"))
        return _Usage(2**30, 2**30, 0) if full else _REAL_USAGE(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)


def _free(monkeypatch, mib: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(2**40, 2**40, mib * 2**20))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("error, full", [
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), False),
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0"),
     True),
    (GGUF_SHORT_WRITE, True),
])
def test_each_librarys_full_disk_is_told_as_one(tmp_path, monkeypatch, error, full):
    _full_while(monkeypatch) if full else _free(monkeypatch, 5000)
    assert write_failure(error, tmp_path).startswith("the disk is full: ")
    assert write_failure(error, tmp_path).endswith(f" MiB free in {tmp_path}")


def test_other_failures_and_a_quota_are_told_as_they_are(tmp_path, monkeypatch):
    _free(monkeypatch, 5000)
    assert write_failure(GGUF_SHORT_WRITE, tmp_path) == "OSError: 3145728 requested and 1261152 written"
    assert write_failure(PermissionError(errno.EACCES, "Permission denied", "x"), tmp_path).startswith(
        "PermissionError: [Errno 13] Permission denied")
    assert write_failure(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path) == \
        f"your disk quota is used up in {tmp_path}"


def test_a_failure_that_is_not_the_disk_is_not_told_to_free_space(tmp_path, monkeypatch):
    """A folder one may not write into (EACCES, a read-only disk) or a filesystem without a size (/proc reports
    0 bytes free) was "the disk is full: 0 MiB free", with "free some space and ... again"."""
    from tunelab.errors import TunelabError
    from tunelab.files import writing

    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(0, 0, 0))  # what /proc and /sys report
    for error in (PermissionError(errno.EACCES, "Permission denied", "x"), OSError(errno.EROFS, "Read-only")):
        with pytest.raises(TunelabError) as got, writing("the merged model m", tmp_path, TunelabError,
                                                         "Nothing was written to m", "merge again"):
            raise error
        assert str(got.value) == f"could not write the merged model m: {write_failure(error, tmp_path)}. Nothing " \
                                 "was written to m; fix that and merge again"
        assert "disk is full" not in str(got.value)
    _free(monkeypatch, 5)  # a real disk with 5 MiB left
    with pytest.raises(TunelabError, match=r"the disk is full: 5 MiB free in .*; free some space and merge again"):
        with writing("the merged model m", tmp_path, TunelabError, "Nothing was written to m", "merge again"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0")


def test_a_checkpoint_judges_the_disk_before_its_partial_files_are_removed(tmp_path, monkeypatch):
    """torch says nothing of the disk: the free space tells, and it was measured after the partial checkpoint was
    removed (room again), so a full disk read as 'RuntimeError: ... failed writing file'."""
    from tunelab.train import checkpoint as ckpt

    def save_model(folder):
        (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    _full_while(monkeypatch, tmp_path / ".checkpoint-2.tmp" / "adapter_model.safetensors")
    with pytest.raises(TunelabError, match=r"could not write checkpoint-2 in .*: the disk is full: 0 MiB free"):
        ckpt.save_checkpoint(tmp_path, "checkpoint-2", save_model)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_merge_names_the_output_and_keeps_the_earlier_model(tiny_model_dir, tmp_path,
                                                                                monkeypatch, capsys):
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    from tunelab.cli import main

    ckpt = tmp_path / "run" / "checkpoint-final"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "tunelab.json").write_text(json.dumps({"base_model": "x", "method": "full", "run_name": "run"}))
    out = tmp_path / "models" / "merged"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # an earlier merged model: replaced only by a complete one
    (out / "tunelab.json").write_text(json.dumps({"merged_from": "run", "files": ["config.json", "tunelab.json"]}))

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", save_file)
    assert main(["merge", "--adapter", str(tmp_path / "run"), "--output", str(out), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert f"error: could not write the merged model {out}: the disk is full: " in err
    assert f"Nothing was written to {out} and no partial copy was left" in err and "Traceback" not in err
    assert _leftovers(out.parent) == [] and sorted(p.name for p in out.iterdir()) == ["config.json", "tunelab.json"]


def test_a_full_disk_during_an_export_leaves_no_partial_gguf(tiny_model_dir, tmp_path, monkeypatch):
    import gguf

    from tunelab.export.gguf import ExportError, export_gguf

    def write_tensors(self, **kw):  # numpy's tofile, out of room part way through a tensor
        self.fout[0].write(b"\0" * 4096)
        raise GGUF_SHORT_WRITE

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_tensors)
    out = tmp_path / "m.gguf"
    _full_while(monkeypatch, out)
    with pytest.raises(ExportError, match=rf"could not write the GGUF export {out}: the disk is full: 0 MiB free in "
                                          rf"{tmp_path}\. Nothing was written to {out} and no partial file was left"):
        export_gguf(tiny_model_dir, out, verify=False)
    assert list(tmp_path.iterdir()) == []


def test_a_modelfile_that_cannot_be_written_leaves_the_earlier_export_as_it_was(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """The Modelfile was written after the new GGUF had replaced the old one: a failure left the new GGUF with the
    old Modelfile (or none), a half-written .Modelfile.tmp, and a traceback."""
    from tunelab.export.gguf import ExportError, export_gguf

    out = tmp_path / "m.gguf"
    export_gguf(tiny_model_dir, out, quant="q8_0", verify=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_write_text = Path.write_text

    def write_text(self, *a, **k):
        if self.name.startswith(".Modelfile.tmp"):
            real_write_text(self, "FROM")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(ExportError, match=rf"could not write the GGUF export {out}: the disk is full"):
        export_gguf(tiny_model_dir, out, quant="f16", verify=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _raw(folder: Path, n: int = 20) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "raw.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(n)))
    return path


def test_a_full_disk_during_prepare_names_the_dataset_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    from tunelab.data import prepare as prep

    raw, out = _raw(tmp_path), tmp_path / "processed" / "raw"
    prep.prepare_dataset([str(raw)], out, console=lambda s: None)
    before = (out / "report.json").read_bytes()

    class Full:  # the records' file, on a disk that filled after the first records
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, text):
            self.n += 1
            if self.n > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def close(self):
            self.f.close()

    real_sink = prep._Pass.sink

    def sink(self, role):
        f = real_sink(self, role)
        if not isinstance(f, Full):
            self.sinks[role] = f = Full(f)
        return f

    monkeypatch.setattr(prep._Pass, "sink", sink)
    with pytest.raises(prep.DataError, match=rf"could not write the prepared dataset {out}: the disk is full: .* MiB "
                                             rf"free in {out.parent}\. Nothing was written to {out}"):
        prep.prepare_dataset([str(raw), str(_raw(tmp_path / "more"))], out, console=lambda s: None)
    assert (out / "report.json").read_bytes() == before and _leftovers(out.parent) == []


def test_prepare_says_before_reading_when_the_disk_looks_too_small(tmp_path, monkeypatch):
    """The records are written as read, then held twice while split: a disk that holds them once failed only
    after the whole pass (tokenising a large input: many minutes)."""
    from tunelab.data import prepare as prep

    said = []
    raw = _raw(tmp_path, 200)
    prep.prepare_dataset([str(raw)], tmp_path / "a", console=said.append)
    assert not any("MiB are free" in s for s in said)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(2**30, 2**30, raw.stat().st_size * 2))
    said.clear()
    prep.prepare_dataset([str(raw)], tmp_path / "b", console=said.append)
    warning = next(s for s in said if "MiB are free" in s)
    assert said.index(warning) < next(i for i, s in enumerate(said) if s.startswith("reading"))
    assert warning.startswith(f"warning: 0 MiB are free in {tmp_path}, and the prepared dataset may take about")


def test_an_input_that_vanishes_during_prepare_is_not_called_a_write_failure(tmp_path, monkeypatch):
    from tunelab.data import prepare as prep

    raw, real_chunks = _raw(tmp_path), prep._chunks

    def chunks(path):  # read when the input is hashed, after the pass
        if Path(path).resolve() == raw.resolve():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real_chunks(path)

    monkeypatch.setattr(prep, "_chunks", chunks)
    with pytest.raises(FileNotFoundError):
        prep.prepare_dataset([str(raw)], tmp_path / "out", console=lambda s: None)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_an_eval_result_that_cannot_be_written_leaves_the_earlier_one_whole(tmp_path):
    """`tunelab eval` on a full disk left an empty eval/<name>.json (written in place after the whole evaluation)."""
    import errno

    from tunelab.evaluate.runner import EvalError, _write_result

    json_path, pred_path = tmp_path / "e.json", tmp_path / "e.predictions.jsonl"
    _write_result(json_path, {"metrics": {"bleu": 1.0}}, pred_path, iter([{"index": 0}]))
    before = json_path.read_text(), pred_path.read_text()

    def rows():
        yield {"index": 0}
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(EvalError, match=r"could not write the eval result .*e\.json: the disk is full.*Nothing of it"):
        _write_result(json_path, {"metrics": {"bleu": 2.0}}, pred_path, rows())
    assert (json_path.read_text(), pred_path.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.predictions.jsonl"]
