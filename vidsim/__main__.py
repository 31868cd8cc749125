from vidsim.cli import entry

entry()
