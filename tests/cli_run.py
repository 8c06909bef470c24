"""Running ``timm-epsa`` inside the test process and reading the one-line error it must end with."""
from timm_epsa import cli


def run_cli(capsys, *args):
    """``timm-epsa ARGS`` in this process: (exit status, stdout, stderr)."""
    status = cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(err, command: str, *fragments) -> str:
    """stderr ends with one ``timm-epsa COMMAND: error: ...`` line (after any progress lines), with
    no other error line and no traceback; the line holds every fragment. Returns it."""
    lines = err.strip().splitlines()
    assert 'Traceback' not in err and [line for line in lines if ': error: ' in line] == lines[-1:], err
    assert lines[-1].startswith(f'timm-epsa {command}: error: '), err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]
