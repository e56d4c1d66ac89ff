"""The command line as a user runs it: `fastsd35 run ...` in this process, and the one-line-error contract."""

from fastsd35.app import cli

FAST = ["--steps", "2", "--width", "64", "--height", "48"]


def run(*argv):
    return cli.main(["run", *map(str, argv)])


def listing(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def fails(capsys, message, *argv, out=None):
    """The run exits 2 with one line naming the problem and leaves `out` as it was."""
    before = listing(out) if out else None
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastsd35: error: "), err
    assert message in err, err
    if out:
        assert listing(out) == before
    return err
