"""The file toolkit: atomic writers refuse to clobber without force, readers name the file and line."""

from __future__ import annotations

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
