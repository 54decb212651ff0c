"""Clients of the Serve app's HTTP API (standard library only: no Ray, no extra packages)."""
