"""Log hygiene for the service's processes: one record, one line, no client data.

Client text reaches log records (a path, a header, an exception message quoting an input);
a CR/LF in it would start a forged log line, and an identifier in it would leave the secure
enclave with the logs. :func:`install` wraps every handler's formatter so that

* control characters and line breaks are escaped (``\\n`` as the two characters ``\\n``);
* a traceback keeps its frames and exception type but not the exception's message (which
  may quote a request's values), on the same line;
* pydantic's ``input_value=...`` in any message is replaced by ``<redacted>``.
"""

from __future__ import annotations

import logging
import re
import traceback
from types import TracebackType

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_INPUT_VALUE = re.compile(r"input_value=.*?(?=, input_type=|\]|$)")


def one_line(text: str) -> str:
    """``text`` with every control character escaped: it can never start a new log line."""
    return _CONTROL.sub(lambda m: repr(m.group(0))[1:-1], text)


def redact(text: str) -> str:
    return _INPUT_VALUE.sub("input_value=<redacted>", text)


def frames_only(
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None],
) -> str:
    """``ValueError at a.py:12 in f <- b.py:3 in g``: where, not what (no message)."""
    etype, _, tb = exc_info
    frames = traceback.extract_tb(tb)[-8:]
    where = " <- ".join(
        f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} in {f.name}" for f in reversed(frames)
    )
    return f"[{etype.__name__} at {where or 'unknown place'}; message withheld]"


class SafeFormatter(logging.Formatter):
    def __init__(self, base: logging.Formatter | None) -> None:
        super().__init__()
        self.base = base or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = frames_only(record.exc_info)  # type: ignore[arg-type]
        record.stack_info = None
        return one_line(redact(self.base.format(record)))


#: our packages: their loggers stay enabled even when a library's ``dictConfig`` (BentoML's
#: worker) disables the loggers that existed before it ran
OUR_PACKAGES = ("core", "governance", "ingest", "features", "models", "serving", "monitoring")


def install() -> int:
    """Wrap the formatter of every handler of every logger (idempotent) and re-enable our
    packages' loggers; returns how many handlers were wrapped."""
    for name, lg in logging.Logger.manager.loggerDict.items():
        if isinstance(lg, logging.Logger) and name.split(".", 1)[0] in OUR_PACKAGES:
            lg.disabled = False
    loggers = [
        logging.getLogger(),
        *(
            lg
            for lg in logging.Logger.manager.loggerDict.values()
            if isinstance(lg, logging.Logger)
        ),
    ]
    n = 0
    for lg in loggers:
        for handler in lg.handlers:
            if not isinstance(handler.formatter, SafeFormatter):
                handler.setFormatter(SafeFormatter(handler.formatter))
                n += 1
    return n
