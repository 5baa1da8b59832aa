"""Small command-line tools, run with ``python -m ovseg_lab.tools.<name>``."""

import functools

import torch


def single_threaded(measure):
    """Run ``measure`` with ``torch.set_num_threads(1)`` and restore the caller's thread count afterwards.

    Timing ratios are taken on one thread; left at 1, the rest of the process (a test session) would compute with
    another summation order than it was written for (the CAT-Seg golden gradients move by 3e-5 relative).
    """

    @functools.wraps(measure)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return measure(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper
