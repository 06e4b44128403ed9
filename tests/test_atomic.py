"""bnkit.atomic: a file is written completely or not at all, with the usual permissions."""
import os
import signal
import stat
import subprocess
import sys

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


def test_the_data_reaches_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"data")
    assert events == [("fsync", tmp), ("replace", str(target)), ("fsync", str(tmp_path))]


def test_mode_of_the_replaced_file_is_kept_and_the_umask_never_touched(tmp_path, monkeypatch):
    target = tmp_path / "private.pt"
    target.write_bytes(b"old")
    target.chmod(0o600)
    monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask changes it for every thread"))
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_name_as_long_as_the_file_system_allows_is_written(tmp_path):
    target = tmp_path / ("é" * 100 + "a" * 48 + ".pt")  # 253 bytes: legal, but not with a suffix added
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"data")
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == [target.name]


def test_sigterm_while_writing_removes_the_partial_file(tmp_path):
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")
    script = ("import sys, time\n"
              "from bnkit.atomic import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    open(tmp, 'wb').write(b'half')\n"
              "    print('writing', flush=True)\n"
              "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.pt"]


def test_a_sigterm_handler_or_ignore_of_the_program_is_kept(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    try:
        for own in (signal.SIG_IGN, lambda signum, frame: None):
            signal.signal(signal.SIGTERM, own)
            with atomic_path(tmp_path / "out.bin") as tmp:
                assert signal.getsignal(signal.SIGTERM) is own
                open(tmp, "wb").write(b"x")
            assert signal.getsignal(signal.SIGTERM) is own
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with atomic_path(tmp_path / "out.bin") as tmp:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # ours, while writing
            open(tmp, "wb").write(b"x")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_write_only_file_can_be_replaced(tmp_path, monkeypatch):
    import bnkit.atomic

    target = tmp_path / "wo.bin"
    target.write_bytes(b"old")
    target.chmod(0o200)
    events, real_fsync, real_chmod = [], bnkit.atomic._fsync, os.chmod
    monkeypatch.setattr(bnkit.atomic, "_fsync", lambda p: events.append(("fsync", str(p))) or real_fsync(p))
    monkeypatch.setattr(os, "chmod",
                        lambda p, mode, **kw: events.append(("chmod", str(p))) or real_chmod(p, mode, **kw))
    with atomic_path(target) as tmp:
        open(tmp, "wb").write(b"new")
    # the new file is read back for its fsync before it gets the old file's mode: 0o200 would refuse that read
    # (to anyone but root, which is why the order is checked and not only the outcome)
    assert events[:2] == [("fsync", tmp), ("chmod", tmp)]
    assert stat.S_IMODE(target.stat().st_mode) == 0o200
    target.chmod(0o600)
    assert target.read_bytes() == b"new"
