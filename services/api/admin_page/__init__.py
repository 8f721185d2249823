"""The admin page's files (served by services/api/admin_ui.py; shipped as package data)."""
