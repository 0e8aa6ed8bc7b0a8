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
            assert (
                client.sendmail("x@ok.example", ["a@example.com"], "Subject: s\r\n\r\nx\r\n") == {}
            )
    assert len(server.messages) == 1


def test_the_plugin_example_configuration_is_valid(tmp_path):
    (toml,) = [b for b in blocks("toml") if "NoSpamExample" in b]
    assert tomllib.loads(toml)["plugins"]["enabled"][0] == "myplugins:NoSpamExample"
    config = parse_config(toml, source="README.md", base_dir=tmp_path)
    assert config.plugins.enabled == ["myplugins:NoSpamExample", "recipients", "maildir"]
