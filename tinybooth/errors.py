"""How a command ends when the user's input is wrong: one line, `error: <what, which file or flag, what to do>`, exit
status 2, no traceback. A bug of ours keeps its traceback; `--debug` (or TINYBOOTH_DEBUG=1) shows it for user errors
too."""
import os
import sys


class UserError(ValueError):
    """The user's input is wrong; the message says what, which file or flag, and what to do."""


def main_guard(main, argv=None):
    """Run main(argv); a UserError (or Ctrl-C) becomes one line on stderr and exit status 2 (130 for Ctrl-C)."""
    from .checkpoint import CheckpointError
    from .data import InstanceImageError
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("TINYBOOTH_DEBUG") == "1"
    try:
        main([a for a in argv if a != "--debug"])
    except (UserError, CheckpointError, InstanceImageError) as e:
        if debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted (Ctrl-C); a training run saved a checkpoint: rerun with --resume", file=sys.stderr)
        return 130
    return 0
