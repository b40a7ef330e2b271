"""The parsers scripts/gen-man documents. Their one-line description is the page's NAME
line already, so the DESCRIPTION section is man/*.include alone."""

import argparse

from kvmnetd import cli, daemon


def _bare(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = None
    return p


def kvmnetd() -> argparse.ArgumentParser:
    return _bare(daemon.parser())


def kvmnetctl() -> argparse.ArgumentParser:
    return _bare(cli.parser())
