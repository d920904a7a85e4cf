"""One `--help` style for every console script: defaults shown where there is one to show."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except for flags and options without a default,
    whose help says what applies when they are not given; descriptions keep their line breaks (lists)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unset = any(action.default is value for value in (None, False, argparse.SUPPRESS))
        if unset or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
