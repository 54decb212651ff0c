"""Training the demo model on the embedded world's own pictures (`python -m dwm.train`)."""
