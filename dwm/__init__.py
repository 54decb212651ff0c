"""dwm: the driving world model library (no Ray in here)."""
