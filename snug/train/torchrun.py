"""torchrun as `snug train` starts it (`python -m snug.train.torchrun`, see train/dist.py's
`launch`): its agent only starts and watches the ranks, so this module imports torch's launcher
and nothing of snug's training (train/dist.py would bring peft and transformers: 10 s to
import here against 3 s, before any rank starts)."""

from __future__ import annotations

import sys


def torchrun(argv: list[str]) -> int:
    """torchrun (`python -m torch.distributed.run`) without its own report of a failed rank:
    the rank has said why in one line, and the report would add a traceback. Returns the exit
    status of the first rank that failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as e:  # SIGTERM passed on: the ranks have saved and said so
        return 128 + e.sigval
    return 0


if __name__ == "__main__":
    from snug.runtime.shutdown import exit_now, stacks_on_request

    stacks_on_request()
    exit_now(torchrun(sys.argv[1:]))
