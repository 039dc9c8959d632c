"""Reaching nodes: run commands, copy files, sync directories (SSH or local, one interface)."""
