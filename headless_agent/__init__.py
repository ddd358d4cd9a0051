"""Aether headless agent: runs on each GPU host, no Qt, no ML."""
