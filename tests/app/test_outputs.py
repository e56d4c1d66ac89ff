"""Output files without a model: checks made before generating, atomic writes with ordinary permissions, faults
during the write (full disk, a folder in the way, the folder removed), and never removing another run's folder."""

import errno
import os
import shutil
import stat

import pytest

from fastsd35.app import outputs
from fastsd35.app.outputs import check_output, image_name, png_size_bound, slug, write_png
from fastsd35.errors import FastSD35Error

NAMES = ["tiny_random_a_23.png", "tiny_random_a_24.png"]


def test_check_output_creates_nothing(tmp_path):
    out = tmp_path / "new" / "deeper"
    check_output(out, NAMES, False, 1000)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_never_removes_a_folder_another_run_writes_into(tmp_path):
    """Run A checks, run B checks the same new folder, A fails: B's image is still written and kept."""
    out = tmp_path / "out"
    check_output(out, NAMES, False, 1000)  # A
    check_output(out, NAMES, False, 1000)  # B
    (out / "x").mkdir(parents=True)  # B has made the folder and is writing: A's failure must leave it
    outputs._remove_if_empty([out / "x"])  # A made (and now removes) only its own, empty folder
    assert write_png(out, "b.png", b"B") == out / "b.png"
    outputs._remove_if_empty([out])  # A again: the folder holds B's image, so it stays
    assert (out / "b.png").read_bytes() == b"B"


def test_a_folder_removed_between_mkdir_and_write_is_made_again(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = outputs.tempfile.mkstemp
    calls = []

    def racing_mkstemp(**kw):  # another run removes the empty folder just after we made it, once
        if not calls:
            calls.append(1)
            os.rmdir(kw["dir"])
        return real(**kw)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", racing_mkstemp)
    assert write_png(out, "a.png", b"data").read_bytes() == b"data"


def test_a_folder_that_keeps_disappearing_is_one_error_not_a_loop(tmp_path, monkeypatch):
    """Another process removing the folder after every mkdir: a few retries, then one clear error; nothing left."""
    out = tmp_path / "out"
    calls = []

    def vanishing_mkstemp(**kw):
        calls.append(1)
        os.rmdir(kw["dir"])
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", kw["dir"])

    monkeypatch.setattr(outputs.tempfile, "mkstemp", vanishing_mkstemp)
    with pytest.raises(FastSD35Error, match=r"the image a.png was generated but could not be written to .*out: the "
                                            r"folder keeps disappearing"):
        write_png(out, "a.png", b"data")
    assert 2 <= len(calls) <= 10 and not out.exists()


def test_the_output_folder_deleted_mid_run_is_made_again(tmp_path):
    out = tmp_path / "out"
    write_png(out, "a.png", b"1")
    shutil.rmtree(out)
    assert write_png(out, "b.png", b"2").read_bytes() == b"2"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_png_permissions_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = write_png(tmp_path, "a.png", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_full_disk_during_the_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs.os, "write", full)
    out = tmp_path / "new"
    with pytest.raises(FastSD35Error, match=f"the image a.png was generated but could not be written to {out}: No space left"):
        write_png(out, "a.png", b"x" * 100)
    assert not out.exists()  # the folder this write made is gone again, with the partial file
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.png").write_bytes(b"k")
    with pytest.raises(FastSD35Error, match="No space left"):
        write_png(tmp_path / "old", "a.png", b"x")
    assert leftovers(tmp_path / "old") == ["keep.png"]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(outputs.os, "write", lambda fd, data: real(fd, bytes(data[:3])))
    assert write_png(tmp_path, "a.png", b"0123456789").read_bytes() == b"0123456789"


def test_overwrite_onto_a_folder(tmp_path):
    (tmp_path / NAMES[0]).mkdir()
    with pytest.raises(FastSD35Error, match=f"--overwrite cannot replace {tmp_path / NAMES[0]}: it is not a file"):
        check_output(tmp_path, NAMES, True, 1000)
    check_output(tmp_path, NAMES, False, 1000)  # without --overwrite the image goes to name-2.png
    with pytest.raises(FastSD35Error, match="could not be written to .*: a folder is in the way"):  # appeared later
        write_png(tmp_path, NAMES[0], b"x", overwrite=True)
    assert leftovers(tmp_path) == [NAMES[0]] and (tmp_path / NAMES[0]).is_dir()


def test_file_names_follow_the_documented_slug():
    """README: lower case, each run of characters other than a-z and 0-9 one "-", at most 48 characters (no "-" left
    at the cut), "untitled" when nothing is left."""
    assert image_name("large_turbo", "A photo of a Red cube!", 23) == "large_turbo_a-photo-of-a-red-cube_23.png"
    assert slug("x" * 48) == "x" * 48 and slug("x" * 49) == "x" * 48
    assert slug("x" * 47 + " yz") == "x" * 47  # the cut falls on the "-": dropped, not kept as a trailing dash
    assert slug("  Ünïcode / ** ") == "n-code" and slug("!!!") == slug("") == "untitled"


def test_collision_names_stop_at_9999(tmp_path, monkeypatch):
    """name.png, name-2.png, ... name-9999.png (the longest name check_output allows for), then one error and no
    temporary file left."""
    tried = []

    def taken(src, dst):
        tried.append(os.path.basename(dst))
        raise FileExistsError(17, "File exists", dst)

    monkeypatch.setattr(outputs.os, "link", taken)
    with pytest.raises(FastSD35Error, match=r"too many files named a-N\.png in "):
        write_png(tmp_path, "a.png", b"x")
    assert len(tried) == 9999 and tried[:2] == ["a.png", "a-2.png"] and tried[-1] == "a-9999.png"
    assert leftovers(tmp_path) == []


def test_names_too_long_for_the_file_system(tmp_path):
    with pytest.raises(FastSD35Error, match="longer than the file system's limit of 255 bytes"):
        check_output(tmp_path / ("d" * 300), NAMES, False, 1000)
    with pytest.raises(FastSD35Error, match="longer than the file system's limit"):
        check_output(tmp_path, ["x" * 260 + ".png"], False, 1000)
    deep = tmp_path.joinpath(*["d" * 200] * 25)
    with pytest.raises(FastSD35Error, match="its path is longer than the system's limit"):
        check_output(deep, NAMES, False, 1000)
    assert leftovers(tmp_path) == []


def test_not_enough_free_space(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 20 << 20))
    check_output(tmp_path, NAMES, False, 2 * png_size_bound(64, 48))
    with pytest.raises(FastSD35Error, match=f"not enough free space for the images in {tmp_path}: 20 MiB free"):
        check_output(tmp_path, NAMES * 10, False, 20 * png_size_bound(1024, 1024))


def test_output_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FastSD35Error, match="is not a folder"):
        check_output(tmp_path / "file" / "out", NAMES, False, 1000)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only folders")
def test_unwritable_folder(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(FastSD35Error, match="cannot write to output folder"):
        check_output(tmp_path / "ro" / "out", NAMES, False, 1000)


def test_free_space_and_name_limits_are_the_documented_ones(tmp_path, monkeypatch):
    """README "Limits": a worst-case PNG is (3 x width + 1) x height bytes plus 1% and 64 KiB, 16 MiB more must stay
    free (also for a folder whose names are not known yet), and names may be 255 bytes where the file system does
    not say."""
    raw = (3 * 1024 + 1) * 768
    assert png_size_bound(1024, 768) == raw + raw // 100 + (64 << 10)
    for nbytes in (0, 3 * png_size_bound(64, 48)):
        for available, ok in ((nbytes + (16 << 20), True), (nbytes + (16 << 20) - 1, False)):
            monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p, a=available: shutil._ntuple_diskusage(1 << 40, 0, a))
            if ok:
                check_output(tmp_path, NAMES, False, nbytes)
                if nbytes == 0:
                    with outputs.output_folder(tmp_path):
                        pass
            else:
                with pytest.raises(FastSD35Error, match="not enough free space"):
                    check_output(tmp_path, NAMES, False, nbytes)
                if nbytes == 0:
                    with pytest.raises(FastSD35Error, match="not enough free space"):
                        with outputs.output_folder(tmp_path):
                            pass
    monkeypatch.undo()

    def no_pathconf(path, name):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(outputs.os, "pathconf", no_pathconf)
    fits = "x" * (255 - len("-9999.png")) + ".png"  # the longest name a collision could give: name-9999.png
    check_output(tmp_path, [fits], False, 0)
    with pytest.raises(FastSD35Error, match="longer than the file system's limit of 255 bytes"):
        check_output(tmp_path, ["x" + fits], False, 0)


def test_png_size_bound_holds_for_noise():
    import io

    import numpy as np
    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    assert len(buffer.getvalue()) <= png_size_bound(80, 64)


# -- the same faults through `fastsd35 run` (tiny preset) -----------------------------------------------------------

FAST = ["--preset", "tiny_random", "--prompt", "a", "--steps", "1", "--width", "64", "--height", "48"]


@pytest.fixture
def cli_run(monkeypatch, tmp_path, capsys):
    from fastsd35.app import cli

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def run(*argv):
        status = cli.main(["run", *FAST, *map(str, argv)])
        lines = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]
        return status, [line for line in lines if line and "sampling:" not in line]

    return run


def test_cli_checks_the_output_before_generating(tmp_path, cli_run, monkeypatch):
    import fastsd35.pipeline.runner

    monkeypatch.setattr(fastsd35.pipeline.runner.Pipeline, "generate", lambda *a, **k: pytest.fail("generated"))
    (tmp_path / "out" / "tiny_random_a_23.png").mkdir(parents=True)
    status, err = cli_run("--out", tmp_path / "out", "--overwrite")
    assert status == 2 and err == [f"fastsd35: error: --overwrite cannot replace {tmp_path / 'out' / 'tiny_random_a_23.png'}: it is not a file"]
    status, err = cli_run("--out", tmp_path / ("x" * 300))
    assert status == 2 and len(err) == 1 and "longer than the file system's limit" in err[0]
    assert leftovers(tmp_path) == ["out"] and leftovers(tmp_path / "out") == ["tiny_random_a_23.png"]


def test_cli_full_disk_is_one_line_and_leaves_nothing(tmp_path, cli_run, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs.os, "write", full)
    out = tmp_path / "out"
    status, err = cli_run("--out", out)
    assert status == 2
    assert err == [f"fastsd35: error: the image tiny_random_a_23.png was generated but could not be written to {out}: No space left on device"]
    assert not out.exists()


def test_cli_interrupted_run_leaves_another_runs_folder(tmp_path, cli_run, monkeypatch):
    """Run A is interrupted while run B (simulated inside A's sampling) has made the folder and written an image."""
    import fastsd35.pipeline.runner

    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        write_png(out, "other-run.png", b"B")
        raise KeyboardInterrupt

    monkeypatch.setattr(fastsd35.pipeline.runner, "sample", interrupted)
    status, err = cli_run("--out", out)
    assert status == 130 and err == ["fastsd35: interrupted"]
    assert leftovers(out) == ["other-run.png"]


def test_limits_at_their_exact_boundaries(tmp_path, monkeypatch):
    """A name of exactly NAME_MAX bytes (counting the "-9999" a repeated name may get) fits and one more byte does
    not; a path one byte under PATH_MAX fits and PATH_MAX itself does not (it needs the terminating NUL); free space
    equal to what is needed is enough and one byte less is not."""
    monkeypatch.setattr(outputs, "_pathconf", lambda path, name, default: {"PC_NAME_MAX": 40, "PC_PATH_MAX": 4096}[name])
    fits = "x" * (40 - len("-9999.png")) + ".png"
    check_output(tmp_path, [fits], False, 0)
    with pytest.raises(FastSD35Error, match="longer than the file system's limit of 40 bytes"):
        check_output(tmp_path, ["x" + fits], False, 0)
    room = 4096 - len(os.fsencode(str(tmp_path.absolute()))) - 1  # bytes left for "/" + the longest name
    monkeypatch.setattr(outputs, "_pathconf", lambda path, name, default: {"PC_NAME_MAX": 4096, "PC_PATH_MAX": 4096}[name])
    name = "y" * (room - 1 - len("-9999.png")) + ".png"
    check_output(tmp_path, [name], False, 0)  # the full path is 4095 bytes
    with pytest.raises(FastSD35Error, match="its path is longer than the system's limit"):
        check_output(tmp_path, ["y" + name], False, 0)
    need = 3 * png_size_bound(64, 48)
    free = need + outputs.FREE_SPACE_MARGIN
    for available, ok in ((free, True), (free - 1, False)):
        monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p, a=available: shutil._ntuple_diskusage(1 << 40, 0, a))
        if ok:
            check_output(tmp_path, NAMES, False, need)
        else:
            with pytest.raises(FastSD35Error, match="not enough free space"):
                check_output(tmp_path, NAMES, False, need)
