"""The help formatter every runtime command shares (rsedge-bench, the engine builder, benchmark scripts).

It lives apart from the commands so that a command never imports another one for it.
"""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends '(default: X)' to options that have a meaningful default, and only to those."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or "default" in text):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = ",".join(str(v) for v in default)
        return f"{text} (default: {default})"
