"""The file toolkit: atomic writers refuse to clobber without force, readers name the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlrm_rlhf.errors import VLRMError
from vlrm_rlhf.files import (
    FileFormatError,
    OutputExistsError,
    atomic_output_dir,
    read_csv,
    read_jsonl,
    write_bytes_atomic,
    write_csv_atomic,
)


def test_read_jsonl_names_the_file_and_line(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(p) == [(1, {"a": 1}), (3, {"a": 2})]
    for text, match in (('{"a": 1}\n{oops\n', r"rows\.jsonl line 2: not valid JSON"),
                        ('{"a": 1}\n[1, 2]\n', r"rows\.jsonl line 2: expected a JSON object, got list"),
                        ("\n\n", r"rows\.jsonl has no rows")):
        p.write_text(text)
        with pytest.raises(FileFormatError, match=match):
            read_jsonl(p)
    with pytest.raises(FileFormatError, match="task file not found: .*nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl", what="task file")
    assert issubclass(FileFormatError, VLRMError) and issubclass(FileFormatError, ValueError)


def test_csv_round_trip_and_no_clobber(tmp_path):
    rows = [{"k": 0, "x": 0.1 + 0.2}, {"k": 1, "y": "b"}]
    p = write_csv_atomic(rows, tmp_path / "t.csv")
    assert read_csv(p) == [{"k": "0", "x": repr(0.1 + 0.2), "y": ""}, {"k": "1", "x": "", "y": "b"}]
    with pytest.raises(OutputExistsError, match="--force"):
        write_csv_atomic(rows[:1], p)
    assert len(read_csv(p)) == 2  # the refused write left the file as it was
    write_csv_atomic(rows[:1], p, force=True)
    assert len(read_csv(p)) == 1
    write_bytes_atomic(b"\x00\x01", tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.bin", "t.csv"]  # no temporary files left behind


def test_output_dir_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "whole").write_text("x")
    assert [f.name for f in out.iterdir()] == ["whole"]
    with pytest.raises(OutputExistsError, match="already exists; pass --force"), atomic_output_dir(out):
        pass
    assert issubclass(OutputExistsError, FileExistsError) and issubclass(OutputExistsError, VLRMError)


# ---- concurrency, leftovers and faults of output folders ---------------------------------------------------
_WRITER = """
import sys, time, types
from pathlib import Path
pkg = types.ModuleType("vlrm_rlhf")  # the package without its heavy __init__ (torch, transformers): fast to start
pkg.__path__ = [sys.argv[6]]
sys.modules["vlrm_rlhf"] = pkg
from vlrm_rlhf.files import atomic_output_dir
out, tag, flag, go, force = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] == "1"
while not go.exists():
    time.sleep(0.01)
try:
    with atomic_output_dir(out, force=force) as tmp:
        flag.write_text(str(tmp))
        for i in range(20):
            (tmp / f"{i}.txt").write_text(tag)
            time.sleep(0.01)
except Exception as e:
    print(type(e).__name__, e)
    sys.exit(3)
"""


def _writers(tmp_path, out, tags, force=False):
    import subprocess
    import sys

    import vlrm_rlhf.files

    go = tmp_path / "go"
    pkg = str(Path(vlrm_rlhf.files.__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(out), t, str(tmp_path / f"flag-{t}"), str(go),
                               "1" if force else "0", pkg], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for t in tags]
    return go, procs


@pytest.mark.parametrize("force", [False, True])
def test_concurrent_writers_never_lose_the_output(tmp_path, force):
    """Racing writers of one folder: exactly one wins, the others get a clear error, the output is whole."""
    import time

    out = tmp_path / "out"
    go, procs = _writers(tmp_path, out, ["a", "b", "c", "d"], force)
    time.sleep(0.5)  # let every writer reach its start line
    go.write_text("")
    results = [(p.wait(60), p.stdout.read()) for p in procs]
    winners = [t for t, (rc, _) in zip("abcd", results, strict=True) if rc == 0]
    assert winners, results
    for rc, text in results:
        assert rc == 0 or "OutputBusyError another run is writing" in text or "OutputExistsError" in text, text
    files = sorted(out.iterdir())
    assert len(files) == 20 and {f.read_text() for f in files} in ({w} for w in winners)
    assert not list(tmp_path.glob(".out.partial-*")) and not list(tmp_path.glob(".out.lock"))


def test_second_writer_gets_a_clear_error_and_leaves_the_first_alone(tmp_path):
    import time

    from vlrm_rlhf.files import OutputBusyError

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    go, (p,) = _writers(tmp_path, out, ["a"], force=True)
    go.write_text("")
    flag = tmp_path / "flag-a"
    while not flag.exists():
        time.sleep(0.01)
    with pytest.raises(OutputExistsError, match="already exists; pass --force"), atomic_output_dir(out):
        pass
    with pytest.raises(OutputBusyError, match=r"another run is writing .*out \(lock .*\.out\.lock\) \(pid \d+\)"), \
            atomic_output_dir(out, force=True):
        pass
    assert (out / "old.txt").read_text() == "old"  # the second run never moved anything aside
    assert Path(flag.read_text()).is_dir()  # nor touched the first run's partial
    assert p.wait(60) == 0, p.stdout.read()
    assert len(list(out.iterdir())) == 20


def test_leftover_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    go, (p,) = _writers(tmp_path, out, ["a"])
    go.write_text("")
    while not (tmp_path / "flag-a").exists():
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists() and len(list(tmp_path.glob(".out.partial-*"))) == 1
    with atomic_output_dir(out) as tmp:
        (tmp / "x").write_text("x")
    assert [f.name for f in out.iterdir()] == ["x"]
    assert not list(tmp_path.glob(".out.partial-*")) and not (tmp_path / ".out.lock").exists()


def test_existing_file_is_never_replaced_by_a_folder(tmp_path):
    f = tmp_path / "out"
    f.write_text("precious")
    for force in (False, True):
        with pytest.raises(OutputExistsError, match=r"out is an existing file, not a folder; it is never replaced"), \
                atomic_output_dir(f, force=force):
            pass
    assert f.read_text() == "precious"


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a read-only /sys")
def test_unwritable_output_folder_is_named(tmp_path):
    from vlrm_rlhf.files import OutputFolderError, write_text_atomic

    with pytest.raises(OutputFolderError, match=r"cannot write into folder /sys\b"), \
            atomic_output_dir("/sys/vlrm-test-out"):
        pass
    with pytest.raises(OutputFolderError, match=r"cannot write into folder /sys\b"):
        write_text_atomic("x", "/sys/vlrm-test-out.txt")


def test_disk_full_names_the_path_and_leaves_nothing(tmp_path):
    import errno

    from vlrm_rlhf.files import DiskFullError, write_atomic

    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*out \(file big\.bin\)"), \
            atomic_output_dir(out) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "big.bin"))
    assert list(tmp_path.iterdir()) == []

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*t\.json"):
        write_atomic(tmp_path / "t.json", full)
    assert list(tmp_path.iterdir()) == []
    assert issubclass(DiskFullError, VLRMError) and issubclass(DiskFullError, OSError)


def test_outputs_overlapping_inputs_are_refused(tmp_path):
    from vlrm_rlhf.files import OverlapError, check_not_overlapping

    models = tmp_path / "models"
    (models / "rm").mkdir(parents=True)
    (tmp_path / "link").symlink_to(models / "rm")
    inputs = {"rm model": models / "rm", "recipe": tmp_path / "r.yaml"}
    for out, how in ((models / "rm", "is the rm"), (models, "contains the rm"), (models / "rm" / "sub", "lies inside the rm"),
                     (tmp_path / "link", "is the rm"), (tmp_path, "contains the rm")):
        with pytest.raises(OverlapError, match=rf"--out {out} {how} model folder .*models/rm: choose"):
            check_not_overlapping(out, inputs, what="--out")
    check_not_overlapping(tmp_path / "elsewhere", inputs, what="--out")
    check_not_overlapping(tmp_path / "r", inputs, what="--out")  # a prefix of a name is not a parent
    assert issubclass(OverlapError, VLRMError) and issubclass(OverlapError, ValueError)
