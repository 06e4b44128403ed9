"""bnkit.atomic: a file is written completely or not at all, with the usual permissions."""
import os
import stat

import pytest

from bnkit.atomic import atomic_path


def test_writes_through_a_temporary_file_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and not target.exists()
        with open(tmp, "wb") as fh:
            fh.write(b"complete")
    assert target.read_bytes() == b"complete"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(target.parent) == ["out.bin"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half")
            raise error()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_folder_at_the_target_is_refused_before_anything_is_created(tmp_path):
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(IsADirectoryError, match=r"out\.onnx is a directory: name the file to write"):
        with atomic_path(tmp_path / "out.onnx"):
            pytest.fail("the block must not run")
    assert os.listdir(tmp_path) == ["out.onnx"] and os.listdir(tmp_path / "out.onnx") == []
