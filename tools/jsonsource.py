"""Read the workflow engine's JSON for the tools: from a file, standard input, or a running server's API.

Not a script: `visualize_graph.py` and `visualize_logs.py` import it.
"""

import json
import sys
import urllib.error
import urllib.request
from typing import Any

REQUEST_TIMEOUT_SECONDS = 10


class InputError(Exception):
    """The input could not be read, or is not what the tool reads; the message says which and why."""


def fetch_json(url: str) -> Any:
    """GET `url` and decode its JSON body; an error answer's own message is reported."""
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_SECONDS) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise InputError(f"{url} answered {exc.code}: {_error_message(exc.read())}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError as exc:
        raise InputError(f"{url} did not answer JSON: {exc}") from None


def read_json(path: str) -> Any:
    """Decode the JSON in file `path`, or in standard input for `-`."""
    try:
        if path == "-":
            return json.load(sys.stdin)
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InputError(f"{'standard input' if path == '-' else path} is not JSON: {exc}") from None


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200] or "no details"
