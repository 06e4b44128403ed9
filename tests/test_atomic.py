"""bnkit.atomic: a file is written completely or not at all, with the usual permissions."""
import errno
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading

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


_SLOW_FSYNC = ("real = bnkit.atomic._fsync\n"
               "def slow(p):\n"
               "    if str(p).endswith('.tmp'):\n"
               "        print('writing', flush=True)\n"
               "        nap()\n"
               "    real(p)\n"
               "bnkit.atomic._fsync = slow\n")


@pytest.mark.parametrize("during", ["block", "fsync"])
def test_sigterm_while_writing_removes_the_partial_file(tmp_path, during):
    """Also while the new file is fsynced after the block (seconds for a large checkpoint): that is still the write,
    and a SIGTERM there must not end the process with the temporary file left behind."""
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")
    # the child naps in short steps: a SIGTERM the kernel hands to another thread (numpy's BLAS thread) only sets
    # a flag that the main thread reads between bytecodes, and one long sleep would hide it for its whole length
    script = ("import sys, time\n"
              "def nap():\n"
              "    for _ in range(3000):\n"
              "        time.sleep(0.1)\n"
              "import bnkit.atomic\n"
              "from bnkit.atomic import atomic_path\n"
              + (_SLOW_FSYNC if during == "fsync" else "") +
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    open(tmp, 'wb').write(b'half')\n"
              + ("    print('writing', flush=True)\n    nap()\n" if during == "block" else ""))
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    proc.terminate()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM  # a loaded CI machine may be slow to exit
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


def test_the_mode_kept_is_the_file_s_not_a_symlink_s(tmp_path):
    """Writing over a symlink (latest.pt -> a private 0600 checkpoint): the mode is the file's, as os.stat gives it;
    a symlink's own mode is 0o777, which would make the new file world-writable."""
    real = tmp_path / "real.pt"
    real.write_bytes(b"old")
    real.chmod(0o600)
    link = tmp_path / "latest.pt"
    link.symlink_to(real)
    assert stat.S_IMODE(os.lstat(link).st_mode) == 0o777  # what the link itself reports
    with atomic_path(link) as tmp:
        open(tmp, "wb").write(b"new")
    assert link.read_bytes() == b"new" and stat.S_IMODE(os.stat(link).st_mode) == 0o600


def test_a_write_from_a_worker_thread_works(tmp_path):
    """A background checkpoint saver writes from a thread: only the main thread may set a signal handler, so the
    SIGTERM handling must stand aside there instead of raising 'signal only works in main thread'."""
    target = tmp_path / "thread.bin"
    errors = []

    def save():
        try:
            with atomic_path(target) as tmp:
                open(tmp, "wb").write(b"from a thread")
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    worker = threading.Thread(target=save)
    worker.start()
    worker.join(timeout=30)
    assert errors == [] and target.read_bytes() == b"from a thread" and os.listdir(tmp_path) == ["thread.bin"]


@pytest.mark.parametrize("fails", ["open", "fsync"])
def test_a_new_file_that_cannot_be_synced_fails_the_write_and_keeps_the_old_file(tmp_path, monkeypatch, fails):
    """An I/O error from fsync (EIO), or no descriptor left to open the new file for it (EMFILE), means its data may
    never reach the disk: renaming it over the old file would trade a good file for a possibly empty one."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    real_open, real_fsync = os.open, os.fsync

    def failing_open(path, flags, *args, **kwargs):
        if fails == "open" and flags == os.O_RDONLY and str(path).endswith(".tmp"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args, **kwargs)

    def failing_fsync(fd):
        if fails == "fsync" and os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", failing_open)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as info:
        with atomic_path(target) as tmp:
            open(tmp, "wb").write(b"new")
    assert info.value.errno == (errno.EMFILE if fails == "open" else errno.EIO)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_a_temporary_name_already_taken_is_left_alone_and_another_drawn(tmp_path, monkeypatch):
    """The random suffix can collide with another writer's temporary file (forced here): that file is not
    truncated or taken over, and the next name drawn is used."""
    other = tmp_path / ".out.bin.aaaaaaaa.tmp"
    other.write_bytes(b"another writer's data")
    draws = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(draws))
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp == str(tmp_path / ".out.bin.bbbbbbbb.tmp")
        open(tmp, "wb").write(b"mine")
    assert target.read_bytes() == b"mine" and other.read_bytes() == b"another writer's data"
    assert sorted(os.listdir(tmp_path)) == [other.name, "out.bin"]
