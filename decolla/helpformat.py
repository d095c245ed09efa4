"""The help format of every DeColla command line: each option's default in its help."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already names its
    default; flags (False) and options without one (None, []) get none. Descriptions are
    printed as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default in ([], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def use_everywhere(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` and its subcommands' parsers with HelpFormatter."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                use_everywhere(sub)
    return parser
