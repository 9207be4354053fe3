"""Adapters for worlds this project did not write, one module each, registered by envs.py."""
