"""The admin API: managed API keys (``/admin/keys``)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
