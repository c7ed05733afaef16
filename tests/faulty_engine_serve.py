"""``zeda`` CLI whose torch engine thread dies at its 20th batch step (a fault injected in the forward).

Used by tests/test_serve_operations.py: the error is a BaseException, which the engine's per-step
error handling does not catch, so the thread itself stops, as it would on a fatal fault.
"""

import sys

from zeda_cli.main import main
from zeda_server.engine import TorchEngine

STEPS_BEFORE_FAULT = 20


class InjectedFault(BaseException):
    pass


steps = [0]
healthy_run_lane = TorchEngine._run_lane


def faulty_run_lane(self, lane, admitted):
    steps[0] += 1
    if steps[0] > STEPS_BEFORE_FAULT:
        raise InjectedFault("fault injected in the forward")
    return healthy_run_lane(self, lane, admitted)


TorchEngine._run_lane = faulty_run_lane
sys.exit(main(sys.argv[1:]))
