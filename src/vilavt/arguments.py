"""argparse pieces the `vilavt` commands share: a parser whose errors are one line, and checked value types."""

import argparse


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (`vilavt CMD: error: ...`, exit status 2);
    `--help` still prints the full usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated non-negative integers ("7,15"; spaces and empty items ignored)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return [int(part) for part in parts]


def choice_list(choices: tuple[str, ...]):
    """An argparse type: a comma-separated, non-empty selection from `choices`."""

    def parse(text: str) -> list[str]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [part for part in parts if part not in choices]
        if not parts or unknown:
            raise argparse.ArgumentTypeError(
                f"expected one or more of {', '.join(choices)} (comma-separated), got {text!r}"
            )
        return parts

    return parse


__all__ = ["CommandParser", "int_at_least", "positive_float", "int_list", "choice_list"]
