"""torchrun, ending a failed run in one line and the failed rank's exit code.

    python launch/torchrun.py --standalone --nproc_per_node 8 train.py --lora ...   # torchrun's arguments

torchrun reports a failed worker by raising ChildFailedError: a traceback of the launcher itself
and a framed summary, then exit code 1 whatever the worker's was (3: out of memory, 2: bad input,
see train.py). This runs the same launcher (torch.distributed.run) and ends instead with one line,
the first failed rank and its error (the line train.py hands torchrun, core/distributed.py's
record_error), and exits with that rank's code. A signal to the launcher ends in one line too, and
exits 0 when the ranks stopped as asked and saved a checkpoint (torchrun exits 1 after any signal).
launch/torchrun.sh and launch/slurm.sbatch start training through it.
"""

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def _not_a_failure_report(record: logging.LogRecord) -> bool:
    """torchrun's own log lines about a failed worker (its exit code, the others sent SIGTERM)."""
    return not record.getMessage().startswith(("failed (exitcode", "Sending process", "Received "))


def _blame(failure) -> int:
    """How surely a failed rank caused the failure, surest first: an error of its own (train.py wrote its
    line to the error file), a signal other than torchrun's SIGTERM (the OOM killer's SIGKILL), an exit
    with nothing recorded (a rank whose collective broke when a peer vanished: core/faults.py records
    nothing for it), and last a rank torchrun stopped with SIGTERM once another had failed (bad input
    fails every rank at once, and the stopped one's error file may be the earlier)."""
    if failure.exitcode > 0:
        return 0 if isinstance(failure.message, dict) else 2  # a dict: read from an error file
    return 3 if failure.exitcode == -signal.SIGTERM else 1


def failure_line(err: ChildFailedError) -> tuple[str, int]:
    """(the one line, the exit code) of the rank that most surely failed first."""
    rank, failure = min(err.failures.items(), key=lambda item: (_blame(item[1]), item[1].timestamp, item[0]))
    code = failure.exitcode
    how = f"exit code {code}" if code > 0 else failure.signal_name()  # killed by a signal: exitcode -signum
    recorded = failure.message.get("message", "") if isinstance(failure.message, dict) else ""  # an error file's
    said = f": {recorded.splitlines()[0]}" if recorded.strip() else ""
    return f"torchrun: {err.name} failed on rank {rank} ({how}){said}", code if code > 0 else 1


def main(argv: list[str]) -> int:
    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).addFilter(_not_a_failure_report)  # the line below says it once
    # torchrun sets 1 thread a worker when this is unset, in a four-line warning; the same, quietly
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved"
        os.environ["NANOTUNE_SAVED_ON_STOP_FILE"] = str(saved)  # core/faults.py: local rank 0 writes its stop line
        try:
            run(parse_args(argv))
        except ChildFailedError as err:
            line, code = failure_line(err)
            print(line, file=sys.stderr, flush=True)
            return code
        except SignalException as err:  # the launcher's own SIGTERM/SIGINT: the ranks got it first
            done = saved.is_file()
            print(f"torchrun: stopped by {err.sigval.name}" + ("; the run saved a checkpoint" if done else ""),
                  file=sys.stderr, flush=True)
            return 0 if done else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
