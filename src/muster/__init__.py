"""Muster: a self-hosted platform control plane that speaks ECE's platform API."""

__version__ = "0.2.0"
