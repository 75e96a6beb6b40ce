"""The ``thinvisor`` command in-process against a throwaway host configuration."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from thinvisor.cli.main import app


def host_env(tmp_path: Path) -> dict[str, str]:
    """A host configuration under ``tmp_path``, and the environment that selects it."""
    config = tmp_path / "host.toml"
    config.write_text(
        f'run_dir = "{tmp_path / "run"}"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[[datastores]]\nname = "local"\npath = "{tmp_path / "ds"}"\n'
    )
    # Its own XDG_CONFIG_HOME: a login of the person running the tests must not apply.
    return {"THINVISOR_CONFIG": str(config), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def tv(env: dict[str, str], *args: str, code: int = 0, stdin: str | None = None) -> str:
    """Run ``thinvisor *args``; its stdout, or its stderr when ``code`` is non-zero."""
    result = CliRunner().invoke(app, list(args), env=env, input=stdin)
    assert result.exit_code == code, result.output
    return result.stderr if code else result.stdout
