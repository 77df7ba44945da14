"""Whether the Hugging Face hub answers, asked once per process, before the libraries that call
it are imported.

Importing bitsandbytes (which peft and transformers do) asks the hub for a CPU kernel
(kernels-community/quantization-bitsandbytes) on CPUs with AVX512-BF16, and huggingface_hub's
client has no timeout: behind a proxy or firewall that takes connections and never answers,
`snug plan` waited there for ever, and where requests fail slowly each hub call is retried with
warnings. So every command that loads those libraries (plan, measure, calibrate, train, merge, chat,
generate, eval) asks once, with a short timeout; when the hub does
not answer, huggingface_hub's offline mode is switched on for this process (and the worker
processes it starts), and one line says so. HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), when set,
is obeyed and nothing is asked.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

PROBE_S = 2.0  # how long the hub has to answer one HEAD request
_offline: bool | None = None  # the answer, once known


def _set_by_user() -> bool | None:
    """HF_HUB_OFFLINE (else TRANSFORMERS_OFFLINE) as huggingface_hub reads it (the first that
    is set and not empty, true for 1/ON/YES/TRUE); None when neither is set."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if not value:
        return None
    return value.upper() in ENV_VARS_TRUE_VALUES


def answers(endpoint: str, timeout: float) -> bool:
    """Whether `endpoint` answers an HTTP HEAD within `timeout` seconds (any status: it is
    there), through huggingface_hub's own client (its proxies and certificates). The request
    runs in a thread that is waited for `timeout` at most: the client's timeout does not cover
    the name lookup (getaddrinfo), which a resolver that does not answer holds for 5 s a try."""
    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def ask() -> None:
        try:
            get_session().head(endpoint, timeout=timeout)
            answered.append(True)
        except Exception:  # noqa: BLE001 (DNS, refused, reset, proxy, TLS, timeout: unreachable)
            answered.append(False)

    asking = threading.Thread(target=ask, name="snug-hub-question", daemon=True)
    asking.start()
    asking.join(timeout)
    return answered == [True]


def offline(say: Callable[[str], None]) -> bool:
    """True when snug works without the hub in this process: the environment says so, or the
    hub did not answer (then offline mode is switched on and `say` hears one line, once)."""
    global _offline
    if _offline is not None:
        return _offline
    given = _set_by_user()
    if given is not None:
        _offline = given
        return given
    from huggingface_hub import constants

    _offline = not answers(constants.ENDPOINT, PROBE_S)
    if _offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # for processes this one starts
        constants.HF_HUB_OFFLINE = True  # read at each call by huggingface_hub and transformers
        say(
            f"{constants.ENDPOINT} did not answer within {PROBE_S:g} s: snug works offline "
            "(bundled model configs, local models and the hub cache; HF_HUB_OFFLINE=0 to ask "
            "the hub anyway)"
        )
    return _offline


def offline_said_on_stderr() -> bool:
    """`offline`, its one line on stderr: for the commands whose stdout is their own output."""
    return offline(lambda line: print(line, file=sys.stderr))
