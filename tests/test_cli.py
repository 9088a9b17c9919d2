"""Every command of `mixsd` prints its help: the module the command table names imports from its stage
folder, and each field's help renders through argparse (which %-formats it: a bare "%" once broke
`mixsd train --help`)."""

from __future__ import annotations

import pytest

from mixsd.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_command_list_prints_every_command(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in COMMANDS)
