"""The library's log lines in the app's logs.

Ray Serve sets up its own logger (`ray.serve`) in each replica: its lines go to the replica's
log file (`logs/serve/replica_*.log` in Ray's session folder) and to the console of `serve
run`. The library's loggers (`dwm.*`) are plain Python loggers that nothing sets up in a Ray
worker, so their INFO lines (the model loaded, the compile buckets, a Carla reconnection)
would be dropped. Every replica and actor of the app hands them to Serve's handlers, or, in a
plain Ray actor (a denoiser stage), to its stderr, which Ray keeps in the worker's log and
shows on the driver's console.
"""

from __future__ import annotations

import logging
import sys

LIBRARY = "dwm"


def route_library_logs(level: int = logging.INFO) -> None:
    """Send the library's log lines at `level` and above to where this process's Serve lines go."""
    library = logging.getLogger(LIBRARY)
    library.setLevel(level)
    handlers = logging.getLogger("ray.serve").handlers
    if not handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s -- %(message)s"))
        handlers = [handler]
    for handler in handlers:
        if handler not in library.handlers:
            library.addHandler(handler)
    library.propagate = False  # once, not also through a root handler Ray may have set up
