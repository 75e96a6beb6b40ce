"""The host agent's REST API."""
