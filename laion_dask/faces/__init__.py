"""Faces: what a user types or opens: the CLI, the Panel dashboards, the search page, the demo."""
