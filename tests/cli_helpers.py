"""Running the commands in-process and reading what a refused command printed, as every test of
what a user sees does. The consoles are widened by conftest's `wide_consoles` fixture."""

from typer.testing import CliRunner

from gelugemm_cli.app import app

runner = CliRunner()


def invoke(*args):
    """`gelugemm ARGS...` in this process; paths and numbers are passed as their text."""
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code=2) -> str:
    """The one `error:` line a refused command prints (and nothing else on stderr)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]
