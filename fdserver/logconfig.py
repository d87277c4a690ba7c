"""Logging of the three programs: the default, ``--log-level``, ``--log-config FILE``.

By default every line goes to stderr as ``TIME PROG[PID] LEVEL message`` at
INFO and above.  ``--log-config FILE`` then applies a ``logging.config``
configuration on top, as gunicorn and uvicorn accept them:

* ``*.json``: a ``dictConfig`` dictionary;
* ``*.yaml`` / ``*.yml``: the same dictionary in YAML (needs PyYAML);
* anything else: an INI file for ``fileConfig``.

Loggers the file does not name keep working (``disable_existing_loggers``
is false unless the file says otherwise), and a ``root`` it configures
replaces the default handler.  ``--log-level`` sets the root logger's level
last, so it wins over the file.

fdapp's access log (:mod:`fdserver.requestlog`) is the logger
``fdserver.access``: its own handler writes each line to stderr (a text
line after the time, a JSON one as it is), and it does not propagate; a
``loggers: {fdserver.access: ...}`` entry in the file routes it elsewhere.
"""

from __future__ import annotations

import configparser
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError

LEVELS = ("debug", "info", "warning", "error", "critical")
ACCESS_LOGGER = "fdserver.access"


def level_name(text: str) -> str:
    """argparse type of --log-level: one of LEVELS, any case."""
    import argparse

    if text.lower() not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LEVELS)}")
    return text.lower()


def setup(prog: str, *, level: str | None = None, config: str | None = None,
          access_log: str | None = None) -> None:
    """Set up logging for *prog* (fdserver, fdapp); UsageError if *config* is bad.

    *access_log* is fdapp's --access-log-format ("text" lines get the time in
    front, "json" ones carry it), or None without --access-log.
    """
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s {prog}[%(process)d] %(levelname)s %(message)s")
    access = logging.getLogger(ACCESS_LOGGER)
    if access_log:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(message)s" if access_log == "json" else "%(asctime)s %(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    if config is not None:
        apply_file(config)
    if level is not None:
        logging.getLogger().setLevel(level.upper())


def apply_file(path: str) -> None:
    """Apply a logging configuration file; UsageError naming the file and the cause."""
    import logging.config  # only with --log-config: 6 ms of every worker's start-up

    where = f"--log-config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text") from None
    suffix = Path(path).suffix.lower()
    if suffix in (".json", ".yaml", ".yml"):
        _apply_dict(where, _parse_json(where, text) if suffix == ".json"
                    else _parse_yaml(where, text))
        return
    parser = configparser.ConfigParser(defaults=None, interpolation=None)
    try:
        parser.read_string(text, source=path)
        logging.config.fileConfig(parser, disable_existing_loggers=False)
    except Exception as exc:        # its handlers' args are evaluated: anything may fail
        raise UsageError(f"{where}: not a usable logging INI file: "
                         f"{_one_line(exc)}") from None


def _parse_json(where: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where}: not valid JSON: {exc}") from None


def _parse_yaml(where: str, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise UsageError(f"{where}: a YAML file needs PyYAML (pip install pyyaml); or write "
                         "it as JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{where}: not valid YAML: {_one_line(exc)}") from None


def _apply_dict(where: str, config: Any) -> None:
    if not isinstance(config, dict):
        raise UsageError(f"{where}: expected a logging.config dictionary (an object with "
                         "\"version\": 1)")
    config.setdefault("disable_existing_loggers", False)
    try:
        logging.config.dictConfig(config)
    except Exception as exc:        # it imports and calls what the file names
        raise UsageError(f"{where}: not a usable logging configuration: "
                         f"{_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
