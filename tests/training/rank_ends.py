"""Run under torchrun by tests/training/test_launch.py: rank 0 ends as the argument says (`error`: an
error of its own, `killed`: SIGKILL, as the kernel's OOM killer would) while rank 1 waits, so
torchrun stops rank 1 itself (SIGTERM) and names rank 0 the root cause."""

import os
import signal
import sys
import time

if os.environ["RANK"] == "0":
    time.sleep(1)
    if sys.argv[1] == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit("rank 0 failed on its own")
time.sleep(120)
