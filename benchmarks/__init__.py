"""Benchmark: the book's recipe as printed vs `experiment=fast` vs a plain transformers loop, plus
all-layers training, a learning-rate sweep and prediction throughput. Prints numbers; asserts nothing.

    python -m benchmarks                         # everything, gpt2-small-sized, 5 epochs (~50 min on 2 cores)
    python -m benchmarks --cases fast,peer --epochs 1 --model gpt2-tiny --predict-lines 2000   # seconds
    python -m benchmarks --cases fast,sweep --sweep-trials 8   # one train.py run vs an 8-trial multirun, per launcher
    python -m benchmarks --cases scale   # gpt2-tiny on 10^4, 10^5, 10^6 messages: s/1,000 msgs per stage, peak RSS

Weights are random (the open weights cannot be downloaded everywhere); shapes and FLOPs are what
matter for speed, and accuracy is reported next to the book's numbers for the same random start.
Each case runs in its own process, so its wall time includes start-up and its peak RSS is its own.
Every training case is also set against its floor: its FLOPs and optimizer traffic at this machine's own
measured rates (benchmarks/floors.py says what it counts).
It lives beside the package, not in it: run it from a source checkout.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # a case's wall time counts from here: start-up and imports included
