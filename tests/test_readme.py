"""The README's promises: it opens with the two commands, and its plugin
example works as shown."""

from __future__ import annotations

import re
import smtplib
import sys
from pathlib import Path

import pytest

from bonzo.config import parse_config
from bonzo.testing import PluginTestServer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_the_readme_opens_with_the_two_commands():
    first = README.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert first == ["pip install . && bonzo serve", "bash .ci/run"]
    assert README.index("```sh") < README.index("## ")


def test_the_plugin_example_refuses_the_spam_domain(tmp_path):
    (source,) = [b for b in blocks("python") if "NoSpamExample" in b]
    namespace: dict[str, object] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    plugin = namespace["NoSpamExample"]()  # type: ignore[operator]
    with PluginTestServer(("myplugins:NoSpamExample", plugin)) as server:
        with smtplib.SMTP(server.host, server.port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                client.sendmail("x@spam.example", ["a@example.com"], "Subject: s\r\n\r\nx\r\n")
            assert info.value.smtp_code == 550
            client.rset()
            # Another spelling of the domain is the same domain.
            assert client.mail("x@SPAM.Example")[0] == 550
            client.rset()
            assert (
                client.sendmail("x@ok.example", ["a@example.com"], "Subject: s\r\n\r\nx\r\n") == {}
            )
    assert len(server.messages) == 1


def test_the_plugin_example_configuration_is_valid(tmp_path):
    (toml,) = [b for b in blocks("toml") if "NoSpamExample" in b]
    assert tomllib.loads(toml)["plugins"]["enabled"][0] == "myplugins:NoSpamExample"
    config = parse_config(toml, source="README.md", base_dir=tmp_path)
    assert config.plugins.enabled == ["myplugins:NoSpamExample", "recipients", "maildir"]


def test_the_plugin_example_runs_as_written(tmp_path):
    """The README's two files, as written, in a directory: ``bonzo serve``
    takes mail for example.com and refuses the spam domain."""
    import subprocess
    import sys

    from daemon_support import DEADLINE, daemon_env, free_port, wait_until

    (source,) = [b for b in blocks("python") if "NoSpamExample" in b]
    (toml,) = [b for b in blocks("toml") if "NoSpamExample" in b]
    (tmp_path / "myplugins.py").write_text(source)
    (tmp_path / "bonzo.toml").write_text(toml)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bonzo",
            "serve",
            "-c",
            "bonzo.toml",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=tmp_path,
        env=daemon_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def listening() -> bool:
            try:
                smtplib.SMTP("127.0.0.1", port, timeout=1).quit()
            except OSError:
                return False
            return True

        wait_until(listening, what="the README's server")
        with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
            with pytest.raises(smtplib.SMTPSenderRefused):
                client.sendmail("x@spam.example", ["a@example.com"], "Subject: s\r\n\r\nx\r\n")
            client.rset()
            assert (
                client.sendmail("x@ok.example", ["a@example.com"], "Subject: s\r\n\r\nx\r\n") == {}
            )
    finally:
        proc.terminate()
        proc.wait(timeout=DEADLINE)
    assert len(list((tmp_path / "Maildir" / "new").iterdir())) == 1
