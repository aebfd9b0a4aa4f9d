"""`python -m dbrx_train.launch -n N train.py <yaml> ...`: Composer's launcher, with Ctrl-C answered as
the launcher itself intends.

Importing Composer installs a handler (composer/core/engine.py) that turns SIGINT into
`SystemExit(130)`; in the launcher that escapes its `except KeyboardInterrupt` and is printed as a
traceback before the ranks are stopped. Here SIGINT raises KeyboardInterrupt again, so a Ctrl-C
prints the launcher's one line ("Ctrl-C received; terminating training processes.") while each rank
saves its checkpoint (training/preemption.py); a second Ctrl-C makes the launcher kill the ranks.
SIGTERM keeps Composer's handling (forwarded to the ranks). `dbrx-train train` and `make` use this.
"""

from __future__ import annotations

import signal
import sys

from composer.cli import launcher


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(launcher.main())


if __name__ == "__main__":
    main()
