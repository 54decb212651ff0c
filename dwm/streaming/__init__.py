"""Video out: compose the decoded views into one strip, encode it to H.264, record and push it."""

from dwm.streaming.compose import compose_strip
from dwm.streaming.encoder import StreamConnectionError, VideoPublisher, session_rtsp_url

__all__ = ["StreamConnectionError", "VideoPublisher", "compose_strip", "session_rtsp_url"]
