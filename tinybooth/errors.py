"""The user's mistakes, told in one line: `error: <what was wrong, which file or flag, what to do>`, exit status 2.

Library code raises `UserError` (or a subclass: `CheckpointError`, `InstanceImageError`, ...) when the input it was
given is wrong: a missing folder, a truncated file, a flag out of range. A command runs its `main` through
`main_guard`, which turns exactly those into one line on stderr. Anything else is a bug of ours and keeps its
traceback, so it can be reported. `--debug` (or TINYBOOTH_DEBUG=1) shows the traceback of a UserError too.

    if __name__ == "__main__":
        sys.exit(main_guard(main))
"""
import argparse
import errno
import os
import sys
import warnings

EXIT_USER_ERROR = 2     # argparse's status for a bad command line; ours for every other user mistake
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UserError(ValueError):
    """The user's input is wrong; the message says what, which file or flag, and what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that a bad command line is a UserError: one `error:` line and exit status 2
    (argparse's own answer is its usage block, then `prog: error: ...`)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def no_space_error(path):
    """The UserError for a full disk while writing `path` (the atomic writers leave earlier outputs intact)."""
    return UserError(f"no space left on device while writing '{path}'; free space and rerun (earlier outputs "
                     f"are intact)")


def is_no_space(exc):
    """True for the OSError a full disk (or quota) raises, or a library's error that wraps it in its text."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, Exception) and "No space left on device" in str(exc)  # as safetensors and torch word it


def debug_requested(argv):
    """--debug on the command line, or TINYBOOTH_DEBUG=1 in the environment."""
    return "--debug" in argv or os.environ.get("TINYBOOTH_DEBUG", "") not in ("", "0")


def one_line(message):
    """A message on one line: the lines of a multi-line message joined with '; '."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings shown by a command read `warning: <message>`, one line, without the source line."""
    print(f"warning: {one_line(message)}", file=file or sys.stderr)


def main_guard(main_fn, argv=None):
    """Run main_fn(argv) and return its exit status; a UserError prints `error: <message>` and returns 2.

    argv: the command line without the program name (default sys.argv[1:]); `--debug` is taken out of it before
    main_fn sees it. Ctrl-C prints one line and returns 130. Any other exception propagates with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    shown_as = warnings.showwarning
    if not debug:
        warnings.showwarning = _show_warning
    try:
        status = main_fn(argv)
        return status if isinstance(status, int) else 0  # a run() returns what it made: success
    except UserError as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.showwarning = shown_as
