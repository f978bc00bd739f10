"""The shapes world: procedural captioned scenes with exact masks (data.py) and a small
colour/shape classifier that scores generations (judge.py)."""
