"""gpt2.utils.fs: the one publish (a reader sees the old content or the complete new one, never a part) and
the one writability check, which checks by doing (as root too: root passes every os.access test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpt2.errors import UserError
from gpt2.utils.fs import atomic_write, check_writable, make_temp_dir, move_into_place


def test_atomic_write_publishes_whole_files_and_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    atomic_write(target, "first\n")
    assert target.read_text() == "first\n"
    atomic_write(target, b"second\n")
    assert target.read_bytes() == b"second\n"

    def half_then_fail(f) -> None:  # noqa: ANN001
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # no temporary left behind


def test_a_folder_is_published_with_one_rename(tmp_path: Path) -> None:
    final = tmp_path / "prepared"
    tmp = make_temp_dir(final)
    (tmp / "a.bin").write_bytes(b"x" * 10)
    assert tmp.parent == final.parent and tmp.name.startswith(".prepared.") and not final.exists()
    move_into_place(tmp, final)
    assert (final / "a.bin").read_bytes() == b"x" * 10 and not tmp.exists()


def test_check_writable_creates_nothing_it_leaves_behind(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "out.json"
    assert check_writable("output_file", target) == target
    assert not (tmp_path / "new").exists()  # the folders made for the check are removed again
    (tmp_path / "exists").mkdir()
    check_writable("export target", tmp_path / "exists" / "hf", is_dir=True)
    assert sorted(p.name for p in (tmp_path / "exists").iterdir()) == []


@pytest.mark.parametrize("where,needle", [
    ("proc", "cannot be written"),  # os.access says yes to root; creating the folder says no
    ("under_file", "is not a directory"),
    ("a_dir", "is a directory"),
])
def test_check_writable_refuses_what_cannot_be_written(where: str, needle: str, tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("keep\n")
    target = {"proc": Path("/proc/gpt2-check/out.txt"), "under_file": tmp_path / "file.txt" / "out.txt",
              "a_dir": tmp_path}[where]
    if where == "proc":
        assert os.access("/proc", os.W_OK) or os.geteuid() != 0  # the case os.access gets wrong for root
    with pytest.raises(UserError, match=f"output_file={target}.*{needle}"):
        check_writable("output_file", target)
    assert (tmp_path / "file.txt").read_text() == "keep\n"
