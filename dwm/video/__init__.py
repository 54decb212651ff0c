"""Video out: compose the decoded views into one strip, encode it to H.264, record and push it."""

from dwm.video.compose import compose_strip
from dwm.video.encoder import StreamConnectionError, VideoEncoder, session_rtsp_url

__all__ = ["StreamConnectionError", "VideoEncoder", "compose_strip", "session_rtsp_url"]
